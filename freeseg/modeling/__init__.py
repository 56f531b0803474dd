"""FreeSeg's networks: the Mask2Former-style mask proposal network (backbone, pixel decoder,
transformer decoder) and the FreeSeg heads built on it (prompts, interaction, criterion, ...).

Import the submodules directly (`from freeseg.modeling.backbone import build_backbone`); this
package file stays empty so that importing one component never pulls in the others.
"""
