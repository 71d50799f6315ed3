from neuronserve.cli import main


def test_generate_streams_to_stdout_and_reports(capsys):
    rc = main(["generate", "What is the capital of France?", "--chat", "--max-tokens", "12", "--stop", "!"])
    out = capsys.readouterr()
    assert rc == 0 and "Paris" in out.out
    assert "tokens, finish:" in out.err and "first token after" in out.err


def test_bad_arguments_name_the_field(capsys):
    assert main(["generate", "hi", "--top-p", "0"]) == 2
    assert "top_p: must be in (0, 1]" in capsys.readouterr().err
