"""``brainscan train``'s log file: what the terminal redraws in place is logged once, in its final state."""

from __future__ import annotations

import io
from pathlib import Path


def test_tee_keeps_the_final_state_of_redrawn_lines(tmp_path: Path) -> None:
    from brainscan_cli.commands.train import _Tee

    screen, log = io.StringIO(), io.StringIO()
    tee = _Tee(screen, log)  # type: ignore[arg-type]
    tee.write("1/3 [==>....]\b\b\b\b\r2/3 [=====>..]")
    tee.write("\b\b\r3/3 [========] done\n\x1b[2Kplain line\n")
    tee.close_pending()
    assert log.getvalue() == "3/3 [========] done\nplain line\n"
    assert "1/3" in screen.getvalue()  # the terminal still gets everything
