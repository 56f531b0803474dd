"""freeseg/errors.py: what a command's signal handling leaves to the processes it forks."""


def test_processes_forked_by_a_command_die_on_sigterm():
    """A pool worker stuck on a lock inherited through fork cannot run a Python handler, so the
    command's SIGTERM handler must not reach its children: their terminate() is a kill."""
    import multiprocessing
    import signal

    from freeseg.errors import run_cli

    def main(argv):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the command's own handler
        with multiprocessing.get_context("fork").Pool(1) as pool:
            return 0 if pool.apply(_child_sigterm_handler) == signal.SIG_DFL else 1

    assert run_cli(main, [], prog="test") == 0


def _child_sigterm_handler():
    import signal

    return signal.getsignal(signal.SIGTERM)
