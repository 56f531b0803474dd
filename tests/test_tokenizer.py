"""Our tokenizer against OpenAI's `SimpleTokenizer` (clip-anytorch), hard-coded golden ids, and the
BPE learner used by the toy world."""

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from freeseg.clip import Tokenizer, default_tokenizer, learn_bpe, tokenize
from freeseg.clip.tokenizer import bytes_to_unicode, find_bpe_file

COCO_STUFF_171 = """person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant
stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella
handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard
surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli
carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote
keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear
hair_drier toothbrush banner blanket branch bridge building-other bush cabinet cage cardboard carpet
ceiling-other ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence
floor-marble floor-other floor-stone floor-tile floor-wood flower fog food-other fruit furniture-other
grass gravel ground-other hill house leaves light mat metal mirror-stuff moss mountain mud napkin net
paper pavement pillow plant-other plastic platform playingfield railing railroad river road rock roof rug
salad sand sea shelf sky-other skyscraper snow solid-other stairs stone straw structural-other table
tent textile-other towel tree vegetable wall-brick wall-concrete wall-other wall-panel wall-stone
wall-tile wall-wood water-other waterdrops window-blind window-other wood""".split()
ADE20K_150 = """wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person earth
door table mountain plant curtain chair car water painting sofa shelf house sea mirror rug field armchair
seat fence desk rock wardrobe lamp bathtub railing cushion base box column signboard chest_of_drawers
counter sand sink skyscraper fireplace refrigerator grandstand path stairs runway case pool_table pillow
screen_door stairway river bridge bookcase blind coffee_table toilet flower book hill bench countertop
stove palm kitchen_island computer swivel_chair boat bar arcade_machine hovel bus towel light truck tower
chandelier awning streetlight booth television_receiver airplane dirt_track apparel pole land bannister
escalator ottoman bottle buffet/counter/sideboard poster stage van ship fountain conveyer_belt canopy
washer plaything swimming_pool stool barrel basket waterfall tent bag minibike cradle oven ball food step
tank trade_name microwave pot animal bicycle lake dishwasher screen blanket sculpture hood sconce vase
traffic_light tray ashcan fan pier crt_screen plate monitor bulletin_board shower radiator glass clock
flag""".split()
VOC_20 = """aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person
pottedplant sheep sofa train tvmonitor""".split()
TEMPLATES = ["a photo of a {}.", "There is a {} in the scene.", "a bad photo of the {}", "itap of my {}!",
             "{}", "the {}'s texture, it's great", "A CROPPED PHOTO OF THE {}?", "art of the {} (2023)",
             "{} — 100% real; #1 \"best\" {}", "<b>{}</b> &amp; friends", "<|startoftext|>{}<|endoftext|>"]
DECORATIONS = ["café", "naïve résumé", "Ångström", "straße", "İstanbul", "Ørsted", "東京タワー", "Ελληνικά",
               "Москва", "مرحبا", "🙂", "👍🏽", "🇫🇷", "❤️", "👨‍👩‍👧", "&lt;tag&gt;", "&#39;quoted&#39;",
               "&amp;amp;", "&nbsp;", "cafÃ©", "3.14159", "1,000,000", "x²", "½", "$5", "...", "?!", "--",
               "\t\t", "\n\n", "   ", "\u00a0", "don't", "we'll", "I'M", "they've", "'ſ", "ＦＵＬＬ"]


def corpus(seed: int = 0) -> list[str]:
    """Class names in templates, with random case, decorations and whitespace (fixed seed)."""
    rng = random.Random(seed)
    texts = []
    for name in COCO_STUFF_171 + ADE20K_150 + VOC_20:
        name = name.replace("_", " ")
        for template in rng.sample(TEMPLATES, 9):
            text = template.format(name, name)
            case = rng.choice([str, str.upper, str.title,
                               lambda s: "".join(c.upper() if rng.random() < 0.5 else c for c in s)])
            words = case(text).split(" ")
            for _ in range(rng.randint(0, 3)):
                words.insert(rng.randint(0, len(words)), rng.choice(DECORATIONS))
            texts.append(rng.choice([" ", "  ", " \t"]).join(words))
    return texts


def test_class_lists_complete():
    assert (len(COCO_STUFF_171), len(ADE20K_150), len(VOC_20)) == (171, 150, 20)


def test_identical_ids_to_openai():
    simple_tokenizer = importlib.import_module("clip.simple_tokenizer")  # clip-anytorch, a test dependency
    clip = importlib.import_module("clip")
    reference = simple_tokenizer.SimpleTokenizer()
    ours = default_tokenizer()
    texts = corpus()
    assert len(texts) >= 3000
    mismatches = [t for t in texts if ours.encode(t) != reference.encode(t)]
    assert not mismatches, mismatches[:5]
    assert torch.equal(tokenize(texts, truncate=True), clip.tokenize(texts, truncate=True).long())
    assert torch.equal(tokenize(texts, context_length=8, truncate=True),
                       clip.tokenize(texts, context_length=8, truncate=True).long())
    # Decoding, including special tokens and bytes that are not valid UTF-8 alone.
    for ids in ([49406, 320, 1125, 49407], list(range(0, 600, 7)), list(range(49000, 49408, 13))):
        assert ours.decode(ids) == reference.decode(ids)
    assert ours.vocab_size == len(reference.encoder) == 49408


# Regression test without the oracle: ids computed once with clip-anytorch's SimpleTokenizer and
# pasted here; they must never change.
GOLDEN = {
    "a photo of a wall-concrete.": [320, 1125, 539, 320, 2569, 268, 9637, 269],
    "There are 2 Giraffes &amp; a   cow!": [997, 631, 273, 16949, 46441, 261, 320, 9706, 256],
    "Café déjà vu 🙂 it's": [15304, 25466, 73, 21259, 13230, 14860, 585, 568],
    "a photo of a buffet/counter/sideboard.": [320, 1125, 539, 320, 17829, 270, 7352, 270, 5869, 1972, 269],
    "pottedplant, tvmonitor": [3547, 4841, 3912, 267, 3197, 10198],
}


def test_golden_ids():
    tokenizer = default_tokenizer()
    for text, ids in GOLDEN.items():
        assert tokenizer.encode(text) == ids, text
    batch = tokenize(list(GOLDEN), context_length=16)
    assert batch.dtype == torch.long and batch.shape == (5, 16)
    assert batch[0, :10].tolist() == [49406, *GOLDEN["a photo of a wall-concrete."], 49407]
    assert batch[0, 10:].eq(0).all()
    assert tokenizer.decode(GOLDEN["a photo of a wall-concrete."]) == "a photo of a wall - concrete . "


def test_too_long_text():
    text = "a very long caption " * 20
    with pytest.raises(ValueError, match="a very long caption"):
        tokenize([text])
    cut = tokenize([text], truncate=True)
    assert cut[0, 0] == 49406 and cut[0, -1] == 49407 and cut.shape == (1, 77)
    assert tokenize(["x"] * 2, context_length=3).tolist() == [[49406, 343, 49407]] * 2


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and list(table.values())[:2] == ["!", '"']


def test_bpe_file_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("FREESEG_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("FREESEG_CLIP_BPE", str(tmp_path / "nowhere.txt.gz"))
    with pytest.raises(FileNotFoundError, match="nowhere.txt.gz"):
        find_bpe_file()
    plain = tmp_path / "merges.txt"
    plain.write_text("#version: 0.2\nc a\nca t</w>\n")
    assert find_bpe_file(plain) == plain  # an explicit path comes first
    monkeypatch.setenv("FREESEG_CLIP_BPE", str(plain))
    tokenizer = Tokenizer()
    assert tokenizer.merges == [("c", "a"), ("ca", "t</w>")] and tokenizer.vocab_size == 512 + 2 + 2
    assert tokenizer.encode("cat") == [513]  # the symbol of merge 1
    # Without a path or variable: the cached download, then the copy inside the `clip` package.
    monkeypatch.delenv("FREESEG_CLIP_BPE")
    if importlib.util.find_spec("clip") is not None:  # not imported: find_spec only locates it
        assert find_bpe_file().parent == Path(importlib.util.find_spec("clip").origin).parent
    # Nothing anywhere: the error says how to get the file.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"weights.download\('bpe_simple_vocab_16e6'\).*clip-anytorch"):
        find_bpe_file()
    cached = tmp_path / "empty-cache" / "bpe_simple_vocab_16e6.txt.gz"
    cached.parent.mkdir()
    cached.write_bytes(b"")
    assert find_bpe_file() == cached


def test_learn_bpe_by_hand():
    # Word counts: "ab" x3, "ac" x1. Pairs: (a, b</w>) 3, (a, c</w>) 1 -> merge (a, b</w>) first.
    merges = learn_bpe(["ab ab", "ab ac"], num_merges=10)
    assert merges == [("a", "b</w>"), ("a", "c</w>")]  # then every word is one symbol: stop early
    tokenizer = Tokenizer(merges=merges)
    assert tokenizer.encode("ab ac") == [512, 513] and tokenizer.eot_token == 515


def test_learn_bpe_round_trip():
    colors, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "star", "triangle"]
    captions = [f"a photo of a {c} {s}." for c in colors for s in shapes] * 3
    merges = learn_bpe(captions, num_merges=60)
    assert len(merges) == len(set(merges)) <= 60
    tokenizer = Tokenizer(merges=merges)
    assert tokenizer.vocab_size == 514 + len(merges)
    for text in captions[:16] + ["A blue STAR, and a purple hexagon! 🙂"]:
        ids = tokenizer.encode(text)
        assert max(ids) < tokenizer.sot_token
        decoded = tokenizer.decode(ids)
        assert tokenizer.encode(decoded) == ids  # decode is the inverse of encode up to spacing
        assert decoded.split() == ["".join(w) for w in text.lower().replace(",", " ,").replace("!", " !")
                                   .replace(".", " .").split()]
    # The corpus words became single tokens: "a photo of a red circle ." is 7 ids.
    assert len(tokenizer.encode("a photo of a red circle.")) == 7
    assert tokenizer(["a red star"], context_length=16).argmax(-1).item() == 4  # EOT is the largest id
