"""skip, xfail, xpass, -x and sft-defaults.yaml, as the spec format promises."""

from __future__ import annotations


def test_xfail_skip_and_strict_xpass(sft, write_spec, one_answer_spec):
    weak = one_answer_spec(epochs=1, lr=1e-6)
    folder = write_spec("a_xfail.sft.yaml", 'xfail: "one epoch is not enough"\n' + weak).parent
    write_spec("b_skip.sft.yaml", 'skip: "not today"\n' + weak)
    write_spec("c_xpass.sft.yaml", 'xfail: "we thought it would fail"\n' + one_answer_spec())
    result = sft("run", folder, "-v")
    outcomes = {r.name: r.outcome for r in result.recorder.reports}
    assert outcomes == {"a_xfail": "xfailed", "b_skip": "skipped", "c_xpass": "xpassed"}
    assert result.code == 0, result.out
    assert "1 skipped, 1 xfailed, 1 xpassed" in result.out.splitlines()[-1]
    assert "skipped: not today" in result.out

    strict = write_spec("strict.sft.yaml", 'xfail: {reason: "should fail", strict: true}\n' + one_answer_spec(),
                        folder=folder / "strict")
    result = sft("run", strict)
    assert result.recorder.reports[0].outcome == "xpassed"
    assert result.code == 1
    assert "XPASS(strict)" in result.out


def test_exitfirst_stops_after_the_first_failure(sft, write_spec, one_answer_spec):
    weak = one_answer_spec(epochs=1, lr=1e-6)
    folder = write_spec("a.sft.yaml", weak).parent
    write_spec("b.sft.yaml", weak)
    result = sft("run", "-x", folder)
    assert [r.name for r in result.recorder.reports] == ["a"]
    assert "stopping after 1 failure" in result.out
    assert result.code == 1


def test_defaults_files_merge_under_specs_nearer_ones_win(sft, write_spec, tmp_path):
    write_spec("sft-defaults.yaml", """\
        model: builtin:tiny-gemma
        method: lora
        lora: {r: 16, lora_alpha: 32}
        training: {num_train_epochs: 30, learning_rate: 1.0e-6}
        tags: [from-root]
    """, folder=tmp_path)
    write_spec("sft-defaults.yaml", "training: {learning_rate: 1.0e-2}\n", folder=tmp_path / "team")
    write_spec("learn.sft.yaml", """\
        data:
          conversations:
            - - {role: user, content: 微调测试}
              - {role: assistant, content: 我学会了}
        expect:
          - {prompt: 微调测试, equals: 我学会了}
    """, folder=tmp_path / "team")
    result = sft("run", tmp_path)
    report = result.recorder.reports[0]
    assert report.settings["training"]["learning_rate"] == 1e-2  # the nearer file won
    assert report.settings["training"]["num_train_epochs"] == 30  # merged from the root file
    assert report.tags == ["from-root"]
    assert result.code == 0, result.out
