"""`lm_eval` (the `spl[eval]` extra, which `make setup` installs) runs a task against a real
`spl serve` both ways, as docs/eval.md says: a loglikelihood (multiple-choice) task and a
generate_until task, each a task YAML over a tiny local dataset written here (no downloads)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DATA = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin"], "answer": 0, "target": "Paris"},
    {"question": "Two plus two equals", "choices": [" four", " banana"], "answer": 0, "target": "four"},
]

# the task files docs/eval.md shows (data_files absolute: datasets resolves them from the cwd)
MULTIPLE_CHOICE = """task: spl_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""
GENERATE = """task: spl_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow
def test_lm_eval_runs_a_loglikelihood_and_a_generate_until_task(server, tmp_path):
    from superlinear.model.default import ensure_default

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in DATA))
    (tasks / "spl_choice.yaml").write_text(MULTIPLE_CHOICE.format(data=data))
    (tasks / "spl_generate.yaml").write_text(GENERATE.format(data=data))
    env = dict(os.environ, OPENAI_API_KEY=server.api_key, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    model_args = (f"model=default,base_url={server.url}/v1/completions,tokenizer={ensure_default()},"
                  "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1")
    lm_eval = Path(sys.executable).with_name("lm_eval")
    run = subprocess.run([str(lm_eval), "--model", "local-completions", "--model_args", model_args,
                          "--tasks", "spl_choice,spl_generate", "--include_path", str(tasks),
                          "--output_path", str(tmp_path / "out"), "--log_samples"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(Path(glob.glob(str(tmp_path / "out/**/results_*.json"), recursive=True)[0]).read_text())
    assert results["n-samples"]["spl_choice"]["effective"] == len(DATA)
    assert results["results"]["spl_choice"]["acc,none"] == 1.0  # the default model knows both
    generated = [json.loads(line) for path in glob.glob(str(tmp_path / "out/**/samples_spl_generate_*.jsonl"),
                                                         recursive=True) for line in open(path)]
    assert len(generated) == len(DATA)
    for sample in generated:
        text = sample["filtered_resps"][0]
        assert isinstance(text, str) and text.strip() and "." not in text, sample
