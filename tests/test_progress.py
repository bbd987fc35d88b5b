"""Progress reports: a bar on a terminal, plain lines every 5% elsewhere."""

import io

from tqdm.auto import tqdm

from fastddpm.progress import Lines, bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_file_gets_a_plain_line_every_five_percent_and_one_at_the_end():
    log = io.StringIO()
    with bar(total=1500, desc="training", unit="step", file=log) as b:
        assert isinstance(b, Lines)
        for step in range(1500):
            b.update(1)
            if step == 700:
                b.set_postfix(loss="0.1234")
    lines = log.getvalue().split("\n")
    assert lines[-1] == "" and "\r" not in log.getvalue()
    assert len(lines) - 1 == 20  # 5%, 10%, ..., 95%, then 100% at close
    assert lines[0].startswith("training:   5%") and "75/1500" in lines[0]
    assert lines[-2].startswith("training: 100%") and "1500/1500" in lines[-2] and "loss=0.1234" in lines[-2]


def test_resumed_and_iterated_reports_count_from_where_they_start():
    log = io.StringIO()
    b = bar(total=100, initial=50, desc="training", file=log)
    b.update(4)
    assert log.getvalue() == ""  # 54%: the next line is due at 55%
    b.update(1)
    b.update(45)
    b.close()
    b.close()  # closing twice writes once
    assert [line[:14] for line in log.getvalue().splitlines()] == ["training:  55%", "training: 100%"]
    log = io.StringIO()
    with bar(total=100, desc="training", file=log) as b:
        b.update(5)
        b.update(2)  # interrupted at 7%: a line at 5%, the last at 7%
    assert [line[:14] for line in log.getvalue().splitlines()] == ["training:   5%", "training:   7%"]
    log = io.StringIO()
    assert list(bar(range(40), desc="sampling", file=log)) == list(range(40))
    assert len(log.getvalue().splitlines()) == 20 and "40/40" in log.getvalue().splitlines()[-1]


def test_a_terminal_gets_tqdm_and_disabled_writes_nothing():
    assert isinstance(bar(total=3, file=Terminal()), tqdm)
    log = io.StringIO()
    b = bar(total=3, disable=True, file=log)
    b.update(3)
    b.close()
    assert log.getvalue() == ""
