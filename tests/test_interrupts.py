"""Interrupts held back inside critical sections (what the command line's signal handler relies on)."""

from __future__ import annotations

import pytest

from vllm_superweight import interrupts


def test_outside_a_section_raises_at_once():
    with pytest.raises(KeyboardInterrupt):
        interrupts.interrupt()


def test_inside_a_section_raised_when_the_outermost_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.critical():
            with interrupts.critical():
                interrupts.interrupt()
                done.append("inner body finished")
            done.append("outer body finished")  # the inner end does not raise yet
    assert done == ["inner body finished", "outer body finished"]
    with interrupts.critical():  # the held interrupt was consumed
        pass


def test_a_failing_body_keeps_its_error_and_drops_the_held_interrupt():
    with pytest.raises(ValueError):
        with interrupts.critical():
            interrupts.interrupt()
            raise ValueError("the body's own error")
    with interrupts.critical():
        pass  # nothing left pending
    with pytest.raises(KeyboardInterrupt):
        interrupts.interrupt()  # and no section is left open
