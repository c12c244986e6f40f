"""Escapes, round 3: nothing a spec, a row, a results file or an imported config holds makes sft-spec read,
write or send a file outside the project (JSON Schema references, metrics that download, folders written
through committed symlinks, importers that copy secrets, Ray uploads that follow links)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from sft_spec_plugins.check import metrics

SPEC = """\
model: builtin:tiny-gemma
data:
  conversations:
    - - {{role: user, content: 微调测试}}
      - {{role: assistant, content: 我学会了}}
expect:
  - prompt: 微调测试
    {check}
"""


@pytest.fixture
def listener():
    """An HTTP server on 127.0.0.1 that records every request it gets."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"type": "string"}')

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


# -- JSON Schema references stay inside the schema -------------------------------------------------------


@pytest.mark.parametrize("reference", ["{url}/schema.json", "file:///etc/passwd", "other.json#/x", "//host/x"])
def test_a_schema_reference_that_leaves_the_document_is_a_located_error_and_nothing_is_fetched(
        tmp_path, sft, listener, reference):
    url, hits = listener
    ref = reference.format(url=url)
    path = tmp_path / "s.sft.yaml"
    path.write_text(SPEC.format(check=f"json_schema: {{properties: {{a: {{$ref: {json.dumps(ref)}}}}}}}"),
                    encoding="utf-8")
    result = sft("validate", path)
    assert result.code != 0
    assert "s.sft.yaml:8:" in result.out + result.err and "leaves the schema" in result.out + result.err
    # Called directly (a plugin, a row that bypassed validation), the check still fetches nothing.
    outcome = metrics.json_schema('{"a": 1}', {"properties": {"a": {"$ref": ref}}}, None)
    assert not outcome.passed and "cannot be applied" in outcome.message
    assert hits == []


@pytest.mark.parametrize("schema,cycle", [
    ({"$ref": "#"}, "# -> #"),
    ({"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"not": {"$ref": "#"}}}}, "#/$defs/a/not"),
    ({"$defs": {"a": {"$anchor": "a", "anyOf": [{"$ref": "#a"}]}}, "$ref": "#a"}, "#/$defs/a/anyOf/0"),
])
def test_a_schema_that_applies_itself_for_ever_is_a_located_error_not_a_recursion_error(tmp_path, sft, schema, cycle):
    problem = metrics.schema_problem(schema)
    assert problem is not None and "for ever" in problem and cycle in problem
    path = tmp_path / "s.sft.yaml"
    path.write_text(SPEC.format(check=f"json_schema: {json.dumps(schema)}"), encoding="utf-8")
    result = sft("validate", path)
    assert result.code != 0 and "s.sft.yaml:8:" in result.out and "for ever" in result.out
    outcome = metrics.json_schema("{}", schema, None)  # called directly: a failed check, never a crash
    assert not outcome.passed


def test_recursive_schemas_that_descend_and_local_references_still_work():
    tree = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}},
            "$defs": {"name": {"$anchor": "name", "type": "string"}}, "required": ["children"]}
    tree["properties"]["name"] = {"$ref": "#name"}
    assert metrics.schema_problem(tree) is None
    assert metrics.json_schema('{"name": "a", "children": [{"children": []}]}', tree, None).passed
    assert not metrics.json_schema('{"name": 1, "children": []}', tree, None).passed
    assert metrics.schema_problem({"const": {"$ref": "http://example.com/x"}}) is None  # data, not a reference


def test_a_rows_value_that_turns_a_schema_recursive_is_an_error_at_that_row(tmp_path, sft):
    (tmp_path / "rows.jsonl").write_text('{"q": "a", "where": "/$defs/x"}\n{"q": "b", "where": ""}\n',
                                         encoding="utf-8")
    path = tmp_path / "s.sft.yaml"
    path.write_text(SPEC.format(check="equals: 我学会了").replace("expect:", """\
eval:
  rows:
    path: rows.jsonl
    prompt: q
    checks: {json_schema: {$defs: {x: {type: string}}, $ref: "#{where}"}}
expect:"""), encoding="utf-8")
    result = sft("validate", path)
    assert result.code != 0
    assert "rows.jsonl: row 2" in result.out or "rows.jsonl:2" in result.out, result.out
    assert "for ever" in result.out


# -- metrics that would download ---------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["flores200", "flores101", "spm", "spBLEU-1K"])
def test_bleu_tokenizers_that_download_are_refused_at_validation(tmp_path, sft, tokenizer):
    path = tmp_path / "s.sft.yaml"
    path.write_text(SPEC.format(check=f"bleu: {{to: 我学会了, tokenize: {tokenizer}}}"), encoding="utf-8")
    result = sft("validate", path)
    assert result.code != 0 and "s.sft.yaml:8:" in result.out
    assert "downloads a SentencePiece model" in result.out and "13a, zh, char, intl, none" in result.out
    with pytest.raises(ValueError, match="never reach the network"):  # and never run, whatever calls it
        metrics.bleu_score("我学会了", "我学会了", tokenize=tokenizer)


def test_the_offline_bleu_tokenizers_are_accepted(tmp_path, sft):
    for tokenizer in metrics.OFFLINE_BLEU_TOKENIZERS:
        assert metrics._bleu_tokenizer_problem(tokenizer) is None
        assert metrics.bleu_score("the cat sat", "the cat sat", tokenize=tokenizer) == pytest.approx(100.0)


# -- folders sft-spec writes into, through committed symlinks ------------------------------------------------

SNAPSHOT_SPEC = """\
model: builtin:tiny-gemma
training: {num_train_epochs: 1, learning_rate: 1.0e-2, report_to: [tensorboard]}
generation: {max_new_tokens: 4}
data:
  conversations:
    - - {role: user, content: 微调测试}
      - {role: assistant, content: 我学会了}
expect:
  - prompt: 微调测试
    snapshot: true
checks: {loss_baseline: true}
"""


@pytest.fixture
def project_with_links(tmp_path, monkeypatch):
    """A project whose committed __snapshots__, __baselines__ and .sft-spec are links to a folder outside it."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (project / "s.sft.yaml").write_text(SNAPSHOT_SPEC, encoding="utf-8")
    for name in ("__snapshots__", "__baselines__", ".sft-spec"):
        (project / name).symlink_to(outside, target_is_directory=True)
    monkeypatch.chdir(project)
    return project, outside


def test_nothing_is_written_through_committed_links_out_of_the_project(project_with_links, sft):
    project, outside = project_with_links
    result = sft("run", "s.sft.yaml", "--no-cache", "--update-snapshots", "--update-baselines")
    assert list(outside.rglob("*")) == [], result.out  # no event file, snapshot or baseline
    assert result.code != 0
    assert "leads outside" in result.out and "through the symlink" in result.out
    assert "s.sft.yaml:2:" in result.out  # the TensorBoard folder, located at report_to


def test_recorded_files_linked_out_are_not_read(project_with_links, sft, tmp_path):
    project, outside = project_with_links
    for name in ("__snapshots__", "__baselines__"):
        (project / name).unlink()
        (project / name).mkdir()
    (project / "__snapshots__" / "s.yaml").symlink_to("/dev/zero")  # read whole, it would never end
    secret = outside / "secret.yaml"
    secret.write_text("s::expect[0]: the secret answer\n", encoding="utf-8")
    (project / "__baselines__" / "s.yaml").symlink_to(secret)
    text = (project / "s.sft.yaml").read_text(encoding="utf-8").replace(", report_to: [tensorboard]", "")
    (project / "s.sft.yaml").write_text(text, encoding="utf-8")
    result = sft("run", "s.sft.yaml", "--no-cache")
    assert result.code == 1
    assert "leads outside" in result.out and "the secret answer" not in result.out


@pytest.mark.parametrize("option", ["--json", "--html", "--junitxml", "--md"])
def test_a_report_named_through_a_link_out_of_the_working_directory_is_a_usage_error(project_with_links, sft,
                                                                                       option):
    project, outside = project_with_links
    result = sft("run", "s.sft.yaml", option, ".sft-spec/report.out")
    assert result.code == 4
    assert "leads outside" in result.err
    assert list(outside.rglob("*")) == []



def test_a_report_the_user_names_outside_the_working_directory_is_written(project_with_links, sft):
    project, outside = project_with_links
    result = sft("schema", "-o", "../outside/schema.json")
    assert result.code == 0, result.err
    assert (outside / "schema.json").is_file()


# -- importers: no secret written, nothing injected, no loop followed -----------------------------------------

MESSAGES = '{"messages": [{"role": "user", "content": "微调测试"}, {"role": "assistant", "content": "我学会了"}]}\n'
TRL_CONFIG = {
    "model_name_or_path": "Qwen/Qwen2.5-0.5B",
    "datasets": [{"path": "data", "token": "hf_datasetTokenAAAAAAAAAAAAAAAAAAAAAAA"}],
    "learning_rate": 0.01,
    "hub_token": "hf_hubTokenAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "wandb_api_key": "0123456789abcdef0123456789abcdef01234567",
    "push_to_hub": True,
    "model_init_kwargs": {"token": "hf_initTokenAAAAAAAAAAAAAAAAAAAAAAA", "revision": "main"},
    "run_name": "hf_runNameLooksLikeATokenAAAAAAAAAAAAA",
    "eos_token": "<end_of_turn>",
    "num_train_epochs\nxfail: injected\ntags": 3,
    "logging_steps\u2028skip: injected": 1,
}


@pytest.fixture
def trl_project(tmp_path):
    import yaml

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(MESSAGES, encoding="utf-8")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(TRL_CONFIG, allow_unicode=True), encoding="utf-8")
    return tmp_path


def test_an_imported_spec_holds_no_credential_and_names_each_one_dropped(sft, trl_project):
    result = sft("import", "trl", trl_project / "recipe.yaml", "--model", "builtin:tiny-gemma")
    text = (trl_project / "recipe.sft.yaml").read_text(encoding="utf-8")
    assert "hf_" not in text and "0123456789abcdef" not in text, text
    for name in ("hub_token", "wandb_api_key", "model_init_kwargs.token", "datasets[0].token", "run_name"):
        assert f"# {name}  # not carried: a credential" in text, (name, text)
    assert "eos_token: <end_of_turn>" in text  # a vocabulary token is not a credential
    assert "hf_" not in result.out + result.err


def test_a_key_with_a_line_break_cannot_inject_keys_into_the_written_spec(sft, trl_project):
    import yaml

    sft("import", "trl", trl_project / "recipe.yaml", "--model", "builtin:tiny-gemma")
    text = (trl_project / "recipe.sft.yaml").read_text(encoding="utf-8")
    spec = yaml.safe_load(text)
    assert "xfail" not in spec and "skip" not in spec and "tags" not in spec, text
    assert all(line.startswith("#") or not line.startswith(("xfail", "skip", "tags")) for line in text.splitlines())
    for line in text.splitlines():  # every comment is one line, whatever reads it
        if "injected" in line:
            assert line.lstrip().startswith("#") or "injected" in repr(spec), line


def test_a_link_loop_in_a_data_folder_is_listed_once_and_named(sft, trl_project, tmp_path):
    (trl_project / "data" / "loop").symlink_to(trl_project / "data", target_is_directory=True)
    (trl_project / "data" / "out").symlink_to(tmp_path.parent, target_is_directory=True)
    result = sft("import", "trl", trl_project / "recipe.yaml", "--model", "builtin:tiny-gemma")
    text = (trl_project / "recipe.sft.yaml").read_text(encoding="utf-8")
    assert text.count("path: data/train.jsonl") == 1, text
    assert "# data/loop: \"link\"  # not carried: a link back to a folder already listed" in text
    assert "# data/out: \"link\"  # not carried: a link out of the data folder" in text
    assert result.code in (0, 1)


def test_a_hidden_config_does_not_become_a_hidden_spec(sft, trl_project):
    (trl_project / ".hidden.yaml").write_text((trl_project / "recipe.yaml").read_text(encoding="utf-8"),
                                              encoding="utf-8")
    result = sft("import", "trl", trl_project / ".hidden.yaml", "--model", "builtin:tiny-gemma")
    assert (trl_project / "hidden.sft.yaml").is_file(), result.out + result.err
    assert not list(trl_project.glob(".*.sft.yaml"))
    for bad in (".x.sft.yaml", "spec.yaml", ".sft.yaml"):
        refused = sft("import", "trl", trl_project / "recipe.yaml", "-o", trl_project / bad)
        assert refused.code == 4 and "a spec file is named NAME.sft.yaml" in refused.err, bad


def test_an_output_folder_through_a_link_out_is_a_usage_error(project_with_links, sft):
    project, outside = project_with_links
    result = sft("run", "s.sft.yaml", "--output-dir", ".sft-spec/out")
    assert result.code == 4 and "--output-dir" in result.err and "leads outside" in result.err
    assert list(outside.rglob("*")) == []


# -- found by a hostile review of the fixes above ---------------------------------------------------------------


def test_a_link_at_a_specs_predictable_output_folder_is_not_written_through(tmp_path, monkeypatch, sft):
    import hashlib

    project, outside = tmp_path / "project", tmp_path / "outside"
    (project / "out").mkdir(parents=True)
    outside.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (project / "s.sft.yaml").write_text(SNAPSHOT_SPEC.replace(", report_to: [tensorboard]", "").replace(
        "checks: {loss_baseline: true}\n", ""), encoding="utf-8")
    name = "s.sft.yaml_s-" + hashlib.sha256(b"s.sft.yaml::s").hexdigest()[:12]
    (project / "out" / name).symlink_to(outside, target_is_directory=True)
    monkeypatch.chdir(project)
    result = sft("run", "s.sft.yaml", "--output-dir", "out", "--no-cache")
    assert list(outside.rglob("*")) == [], result.out
    assert result.code != 0 and "leads outside" in result.out


@pytest.mark.parametrize("cwd,args", [
    (".", ["init"]),  # the default folder, specs/, is a link out
    ("sub", ["schema", "-o", "../reports/s.json"]),  # inside the project, outside the working directory
    ("sub/deeper", ["schema", "-o", "lnk/../../../r.json"]),  # a link, then .. from where it led
    (".", ["run", "s.sft.yaml", "--cache-dir", ".sft-spec/c"]),
    (".", ["cache", "info", "--cache-dir", ".sft-spec/c"]),
])
def test_command_line_paths_through_links_in_the_project_are_refused_wherever_they_start(project_with_links, sft,
                                                                                         monkeypatch, cwd, args):
    project, outside = project_with_links
    for link in ("specs", "reports", "sub/deeper/lnk"):
        (project / link).parent.mkdir(parents=True, exist_ok=True)
        (project / link).symlink_to(outside, target_is_directory=True)
    monkeypatch.chdir(project / cwd)
    result = sft(*args)
    assert result.code == 4, (args, result.out, result.err)
    assert "leads outside" in result.err
    assert list(outside.rglob("*")) == []


def test_history_entries_that_are_links_are_skipped_not_read(tmp_path, sft, write_spec):
    from sft_spec_plugins.report.history import read_history

    folder = tmp_path / "history"
    folder.mkdir()
    (folder / "0001.json").symlink_to("/dev/zero")
    outside = tmp_path / "entry.json"
    outside.write_text('{"history_version": 1, "created": "x", "specs": {}}', encoding="utf-8")
    (folder / "0002.json").symlink_to(outside)
    history = read_history(folder)
    assert history.entries == []
    assert len(history.warnings) == 2 and all("not a regular file" in w for w in history.warnings)


def test_credentials_under_other_spellings_and_inside_values_are_never_written(sft, tmp_path):
    import yaml

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(MESSAGES, encoding="utf-8")
    secret = "hf_" + "S" * 30
    config = {"model_name_or_path": "Qwen/Qwen2.5-0.5B", "datasets": [{"path": "data"}], "hub-token": "abc1",
              "wandbApiKey": "abc2", "hfApiToken": "abc3", "clientSecret": "abc4",
              "headers": {"Authorization": "Bearer abcdefghijklmnop"}, "run_name": f"exp {secret}",
              "mlflow_tracking_uri": "https://alice:pa55word@mlflow.example.com", "a\x07b": 1}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = sft("import", "trl", tmp_path / "r.yaml", "--model", "builtin:tiny-gemma")
    text = (tmp_path / "r.sft.yaml").read_text(encoding="utf-8")
    for leaked in ("abc1", "abc2", "abc3", "abc4", "abcdefghijklmnop", secret, "pa55word"):
        assert leaked not in text and leaked not in result.out, leaked
    assert yaml.safe_load(text) is not None and "a\\x07b" in text  # a control character is shown, not written


def test_a_link_to_a_file_ray_leaves_out_is_left_out_too(tmp_path):
    pytest.importorskip("ray")
    import subprocess

    from sft_spec_plugins.suite.ray_cluster import upload_excludes

    root = tmp_path / "p"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "config").write_text("[http]\n extraheader = AUTHORIZATION: basic x\n", encoding="utf-8")
    (root / ".env").write_text("TOKEN=x\n", encoding="utf-8")
    (root / "ignored.json").write_text("{}", encoding="utf-8")
    (root / "kept.jsonl").write_text("{}\n", encoding="utf-8")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".gitignore").write_text("ignored.json\n", encoding="utf-8")
    for name, target in (("cfg.csv", ".git/config"), ("env.txt", ".env"), ("i.json", "ignored.json"),
                         ("k.jsonl", "kept.jsonl")):
        (root / name).symlink_to(root / target)
    patterns, notes = upload_excludes(root)
    assert sorted(patterns) == ["/cfg.csv", "/env.txt", "/i.json"], notes
    assert any("ignored by git" in n for n in notes) and any("hidden or excluded" in n for n in notes)


@pytest.mark.parametrize("schema,problem", [
    ({"properties": {"enum": {"$ref": "http://example.com/x"}}}, "leaves the schema"),
    ({"$defs": {"b": {"$id": "http://x/b", "allOf": [{"$ref": "#"}]}}, "$ref": "#/$defs/b"}, "embeds another schema"),
    ({"allOf": [{"$ref": "#foo"}], "$defs": {"b": {"$anchor": "foo"}, "z": {"$anchor": "foo"}}}, "named twice"),
    ({"$ref": "#/properties/default", "properties": {"default": {"type": "string"}}}, None),
    ({"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"i": {"$id": "#item"}}, "$ref": "#item"},
     None),
    ({"$schema": "http://json-schema.org/draft-07/schema#", "$ref": "#/definitions/a", "allOf": [{"$ref": "#"}],
      "definitions": {"a": {"type": "string"}}}, None),  # draft 7 ignores what stands beside a $ref
])
def test_schema_keywords_are_walked_by_what_they_hold(schema, problem):
    found = metrics.schema_problem(schema)
    assert (found is None) if problem is None else (problem in (found or "")), found


def test_a_row_value_equal_to_its_placeholder_is_still_validated(tmp_path, sft):
    (tmp_path / "rows.jsonl").write_text('{"q": "a", "t": "{t}"}\n', encoding="utf-8")
    path = tmp_path / "s.sft.yaml"
    path.write_text(SPEC.format(check="equals: 我学会了").replace("expect:", """\
eval:
  rows:
    path: rows.jsonl
    prompt: q
    checks: {bleu: {to: x, tokenize: "{t}"}}
expect:"""), encoding="utf-8")
    result = sft("validate", path)
    assert result.code != 0 and "rows.jsonl" in result.out and "bleu.tokenize" in result.out, result.out


def test_a_spec_never_reads_gits_own_files(tmp_path, sft):
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text('{"messages": []}\n', encoding="utf-8")
    path = tmp_path / "s.sft.yaml"
    path.write_text(SPEC.format(check="equals: 我学会了").replace(
        "data:\n  conversations:", "data:\n  files: [{path: .git/config}]\n  conversations:"), encoding="utf-8")
    result = sft("validate", path)
    assert result.code != 0 and "inside a .git folder" in result.out, result.out


def test_an_alias_bomb_in_an_imported_config_is_refused(tmp_path, sft):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\nmodel_name_or_path: x\n", encoding="utf-8")
    result = sft("import", "trl", tmp_path / "bomb.yaml")
    assert result.code == 4 and "alias bomb" in result.err, result.err  # refused before anything walks it


def test_markdown_shows_a_mention_a_url_and_an_issue_number_as_their_text():
    from sft_spec_plugins.common.escape import md_text

    # The entities of the later rules once had their own "#" rewritten: "@org" showed as "&#64;org".
    assert md_text("@org/team see https://x.example #12") == "&#64;org/team see https&#58;//x.example &#35;12"
