"""minidpo.errors: a UserError is one line on stderr and exit status 2; anything else keeps its traceback."""

import pytest

from minidpo.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, RecordError, UserError, exit_status


def test_user_error_is_one_line_and_exit_2(capsys):
    def fail():
        raise UserError("input file not found: x.jsonl", code="missing_path")

    assert exit_status("minidpo convert", fail) == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == "minidpo convert: error: input file not found: x.jsonl\n"


def test_return_values_become_exit_statuses(capsys):
    assert exit_status("minidpo x", lambda: 0) == 0
    assert exit_status("minidpo x", lambda: 3) == 3
    assert exit_status("minidpo train", lambda: {"global_step": 2}) == 0  # train.main returns its summary
    assert exit_status("minidpo x", lambda: None) == 0
    assert capsys.readouterr().err == ""


def test_interrupt_is_130_and_other_errors_keep_their_traceback(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert exit_status("minidpo train", interrupted) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "minidpo train: interrupted\n"
    with pytest.raises(ZeroDivisionError):
        exit_status("minidpo train", lambda: 1 / 0)


def test_errors_carry_a_code():
    assert UserError("x").code == "bad_option" and UserError("x", code="output_dir").code == "output_dir"
    e = RecordError("invalid_json", "not valid JSON")
    assert (e.code, e.message, str(e)) == ("invalid_json", "not valid JSON", "invalid_json: not valid JSON")
    assert isinstance(e, ValueError) and not isinstance(e, UserError)
