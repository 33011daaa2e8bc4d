"""MT-Bench-style evaluation: questions, judge prompts, rating parsing, scoring, the local and OpenAI-compatible
judges (against a stub server on 127.0.0.1), bad input, and whole runs with tiny local models on both sides."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import DATA, ROOT, compose_run
from tokenizers.processors import TemplateProcessing

from s2ft.data.prompt import build_prompt
from s2ft.errors import UserError
from s2ft.evaluation.judge import (
    JudgeError,
    JudgeRequest,
    LocalJudge,
    OpenAIJudge,
    build_judge,
    parse_rating,
    rating_complete,
    render_request,
)
from s2ft.evaluation.measure import special_token_check
from s2ft.evaluation.mtbench import (
    CATEGORIES,
    JUDGE_PROMPTS,
    NEED_REFERENCE,
    QUESTIONS_FILE,
    SECOND_TURN,
    MTBenchError,
    Question,
    answer_questions,
    conversation_prompt,
    grade,
    judge_requests,
    load_questions,
    mtbench_metrics,
    run_mtbench,
    score,
    select_questions,
    validate_mtbench,
)
from s2ft.lightning.summary import flat_metrics
from s2ft.models import build_model, tiny_tokenizer

LOCAL_JUDGE = {"kind": "local", "max_tokens": 6, "local": {"model": "tiny_qwen2", "batch_size": 4}}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def run_cfg(judge: dict, limit=None, **mtbench) -> dict:
    return {
        "seed": 0,
        "paths": {"data_dir": str(DATA), "cache_dir": None},
        "eval": {"limit": limit, "batch_size": 4, "max_new_tokens": 6, "mtbench": {"judge": judge, **mtbench}},
    }


class ScriptedJudge:
    """A deterministic fake judge: the reply for each request comes from ``reply(request)``."""

    name = "scripted"

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    def judge(self, requests):
        self.requests.extend(requests)
        return [self.reply(request) for request in requests]


# --- questions ---------------------------------------------------------------------------------------------------


def test_shipped_questions_are_two_per_category_with_references_where_mtbench_needs_them():
    questions = load_questions(DATA / QUESTIONS_FILE)
    assert len(questions) == 16 and len({q.question_id for q in questions}) == 16
    assert sorted(q.category for q in questions) == sorted(CATEGORIES * 2)
    for question in questions:
        assert len(question.turns) == 2 and all(turn.strip() for turn in question.turns)
        assert (question.reference is not None) == (question.category in NEED_REFERENCE)


def test_references_file_overrides_inline_references(tmp_path):
    questions = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"question_id": 1, "category": "math", "turns": ["a", "b"], "reference": ["inline 1", "inline 2"]},
            {"question_id": 2, "category": "math", "turns": ["c", "d"], "reference": ["x", ""]},  # empty: unusable
            {"question_id": 3, "category": "writing", "turns": ["e", "f"]},
        ],
    )
    inline = load_questions(questions)
    assert [q.reference for q in inline] == [("inline 1", "inline 2"), None, None]
    refs = write_jsonl(tmp_path / "gpt-4.jsonl", [{"question_id": 2, "choices": [{"index": 0, "turns": ["r1", "r2"]}]}])
    assert [q.reference for q in load_questions(questions, refs)] == [("inline 1", "inline 2"), ("r1", "r2"), None]


def test_question_subset_is_deterministic_and_in_file_order():
    questions = load_questions(DATA / QUESTIONS_FILE)
    subset = select_questions(questions, 5, seed=3)
    assert subset == select_questions(questions, 5, seed=3) and len(subset) == 5
    ids = [q.question_id for q in subset]
    assert ids == sorted(ids) and ids != [q.question_id for q in select_questions(questions, 5, seed=4)]
    assert select_questions(questions, None) == questions == select_questions(questions, 99)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question_id": 1, "category": "math", "turns": ["a", "b"]}', "{not json"], r"q.jsonl:2: not a JSON line"),
        (['{"question_id": 1, "turns": ["a", "b"]}'], r"q.jsonl:1: a question needs question_id, category and turns"),
        (['{"question_id": 1, "category": "math", "turns": ["only one"]}'], r"q.jsonl:1: turns must be a list of two"),
        (['{"question_id": 1, "category": "math", "turns": ["a", " "]}'], r"turns must be a list of two non-empty"),
        (
            ['{"question_id": 7, "category": "math", "turns": ["a", "b"]}'] * 2,
            r"q.jsonl:2: question_id 7 appears twice",
        ),
        ([""], r"holds no questions"),
    ],
)
def test_malformed_question_files_are_clear_user_errors(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "q.jsonl", lines)
    with pytest.raises(MTBenchError, match=message) as caught:
        load_questions(path)
    assert isinstance(caught.value, UserError)


def test_bad_mtbench_configs_are_reported_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("S2FT_TEST_JUDGE_KEY", raising=False)
    cfg = run_cfg({"kind": "claude"}, questions=str(tmp_path / "missing.jsonl"), extra=1)
    with pytest.raises(MTBenchError) as caught:
        validate_mtbench(cfg)
    message = str(caught.value)
    assert "unknown keys ['extra']" in message
    assert f"question file {tmp_path / 'missing.jsonl'} does not exist" in message
    assert "eval.mtbench.judge.kind must be one of ('openai', 'local'), got 'claude'" in message
    openai = {"kind": "openai", "openai": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "S2FT_TEST_JUDGE_KEY"}}
    with pytest.raises(MTBenchError) as caught:
        validate_mtbench(run_cfg(openai))
    assert "eval.mtbench.judge.openai.model is required" in str(caught.value)
    assert "S2FT_TEST_JUDGE_KEY is not set" in str(caught.value)
    with pytest.raises(JudgeError, match=r"judge.local: unknown keys \['temperature'\]"):
        build_judge({"kind": "local", "local": {"model": "tiny_llama", "temperature": 0.7}})
    validate_mtbench(run_cfg(LOCAL_JUDGE))  # the shipped questions and a valid local judge pass
    validate_mtbench({"eval": {"mtbench": None}, "paths": {"data_dir": str(DATA)}})  # disabled: nothing to check


# --- judge prompts and ratings -----------------------------------------------------------------------------------


def test_judge_requests_use_fastchats_single_answer_prompts():
    math = Question(1, "math", ("What is 2+2?", "And 3+3?"), ("4", "6"))
    (name_1, turn_1), (name_2, turn_2) = judge_requests(math, ("four", "six"))
    assert (name_1, name_2) == ("single-math-v1", "single-math-v1-multi-turn")
    assert turn_1.system == "You are a helpful assistant."
    assert turn_1.user.endswith(
        "[Question]\nWhat is 2+2?\n\n[The Start of Reference Answer]\n4\n[The End of Reference Answer]\n\n"
        "[The Start of Assistant's Answer]\nfour\n[The End of Assistant's Answer]"
    )
    assert turn_2.system == JUDGE_PROMPTS["single-math-v1-multi-turn"][0]
    assert "### Reference answer:\n6\n\n<|The End of Reference Answer|>" in turn_2.user
    assert turn_2.user.endswith(
        "### User:\nAnd 3+3?\n\n### Assistant A:\nsix\n\n<|The End of Assistant A's Conversation with User|>"
    )
    assert 'strictly following this format: "[[rating]]", for example: "Rating: [[5]]".' in turn_1.user
    # A math question without a reference, and any other category, get the general prompts.
    for question in (Question(2, "math", ("q", "r")), Question(3, "writing", ("q", "r"), ("ignored", "x"))):
        names = [name for name, _ in judge_requests(question, ("a", "b"))]
        assert names == ["single-v1", "single-v1-multi-turn"]
    assert "{" not in turn_1.user + turn_2.user  # every field filled


@pytest.mark.parametrize(
    ("judgment", "expected"),
    [
        ("The answer is fine.\n\nRating: [[7]]", (7.0, None)),
        ("Rating: [[8.5]]", (8.5, None)),
        ("I would give it [6] overall", (6.0, None)),  # FastChat's fallback format
        ("first [[3]], on reflection [[9]]", (3.0, None)),  # the first rating counts
        ("[[10]]", (10.0, None)),
        ("Rating: [[0]]", (None, "rating 0 outside 1-10")),
        ("Rating: [[11]]", (None, "rating 11 outside 1-10")),
        ("a fine answer, I rate it seven", (None, "no [[rating]] in the judgment")),
        ("", (None, "no [[rating]] in the judgment")),
    ],
)
def test_parse_rating(judgment, expected):
    assert parse_rating(judgment) == expected


def test_local_judge_stop_rule_needs_the_double_bracket_rating():
    assert rating_complete("so Rating: [[4]]") and not rating_complete("so Rating: [4") and not rating_complete("[4]")


# --- scoring -----------------------------------------------------------------------------------------------------


def test_scores_per_turn_category_and_overall_leave_missing_ratings_out():
    questions = [
        Question(1, "writing", ("w1", "w2")),
        Question(2, "writing", ("x1", "x2")),
        Question(3, "math", ("m1", "m2"), ("r1", "r2")),
        Question(4, "coding", ("c1", "c2")),
    ]
    replies = {
        ("w1", 1): "Rating: [[8]]",
        ("w1", 2): "Rating: [[6]]",
        ("x1", 1): "Rating: [[5]]",
        ("x1", 2): "no verdict",  # missing
        ("m1", 1): "[[9]]",
        ("m1", 2): "Rating: [[2.5]]",
        ("c1", 1): "Rating: [[12]]",  # out of range: missing
        ("c1", 2): "Rating: [[3]]",
    }

    def reply(request: JudgeRequest) -> str:
        turn = 2 if "### Assistant A:" in request.user else 1
        first_turn = next(q.turns[0] for q in questions if f"\n{q.turns[0]}\n" in request.user)
        return replies[first_turn, turn]

    judge = ScriptedJudge(reply)
    answers = [(f"answer {q.question_id}a", f"answer {q.question_id}b") for q in questions]
    records = grade(questions, answers, judge)
    assert len(judge.requests) == 8
    assert [r["ratings"] for r in records] == [[8.0, 6.0], [5.0, None], [9.0, 2.5], [None, 3.0]]
    assert records[1]["rating_errors"] == [None, "no [[rating]] in the judgment"]
    assert records[3]["rating_errors"] == ["rating 12 outside 1-10", None]
    assert records[2]["judge_prompts"] == ["single-math-v1", "single-math-v1-multi-turn"]
    assert records[0]["answers"] == ["answer 1a", "answer 1b"] and records[0]["judgments"][1] == "Rating: [[6]]"
    result = score(records)
    assert result == {
        "score": round((8 + 6 + 5 + 9 + 2.5 + 3) / 6, 4),
        "turn_1": round((8 + 5 + 9) / 3, 4),
        "turn_2": round((6 + 2.5 + 3) / 3, 4),
        "categories": {"writing": round(19 / 3, 4), "math": 5.75, "coding": 3.0},
        "ratings": {"1": [8.0, 6.0], "2": [5.0, None], "3": [9.0, 2.5], "4": [None, 3.0]},
        "n_questions": 4,
        "n_rated": 6,
        "missing_ratings": 2,
    }
    metrics = mtbench_metrics(result)
    assert metrics == {
        "mtbench/score": result["score"],
        "mtbench/turn_1": result["turn_1"],
        "mtbench/turn_2": result["turn_2"],
        "mtbench/missing_ratings": 2,
        "mtbench/writing": result["categories"]["writing"],
        "mtbench/math": 5.75,
        "mtbench/coding": 3.0,
    }
    assert flat_metrics({"eval": {}, "mtbench": result}) == metrics
    unrated = score([{**records[1], "ratings": [None, None]}])
    assert (unrated["score"], unrated["categories"], unrated["missing_ratings"]) == (None, {"writing": None}, 2)
    assert mtbench_metrics(unrated) == {"mtbench/missing_ratings": 2}  # no mean to log, never a zero


# --- local models ------------------------------------------------------------------------------------------------


def test_second_turn_prompt_holds_the_first_answer():
    model, tokenizer = build_model("tiny_llama")
    question = Question(1, "writing", ("Say hi.", "Say bye."))
    (first, second), *_ = answer_questions(model, tokenizer, [question], max_new_tokens=5, batch_size=1)
    prompts = []
    original = model.generate

    def recording(**kwargs):
        prompts.extend(tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=True))
        return original(**kwargs)

    model.generate = recording
    assert answer_questions(model, tokenizer, [question], max_new_tokens=5, batch_size=1) == [(first, second)]
    assert prompts[0].endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert prompts[1] == prompts[0] + first + "\n\n### Instruction:\nSay bye.\n\n### Response:\n"


def test_whole_evaluation_with_tiny_local_candidate_and_judge(tmp_path):
    """The config path end to end: a random tiny judge never writes a rating, and every turn is counted missing."""
    model, tokenizer = build_model("tiny_llama")
    result = run_mtbench(model, tokenizer, run_cfg(LOCAL_JUDGE, limit=3), tmp_path)
    assert result["judge"] == "local:tiny_qwen2" and result["questions"] == str(DATA / QUESTIONS_FILE)
    assert (result["n_questions"], result["n_rated"], result["missing_ratings"]) == (3, 0, 6)
    assert result["score"] is None and result["turn_1"] is None and set(result["categories"].values()) == {None}
    lines = [json.loads(line) for line in (tmp_path / "predictions" / "mtbench.jsonl").read_text().splitlines()]
    expected = select_questions(load_questions(DATA / QUESTIONS_FILE), 3, seed=0)
    assert [line["question_id"] for line in lines] == [q.question_id for q in expected]
    for line in lines:
        assert line["ratings"] == [None, None] and line["judge"] == "local:tiny_qwen2"
        assert line["rating_errors"] == ["no [[rating]] in the judgment"] * 2
        assert len(line["answers"]) == 2 and len(line["judgments"]) == 2
    # Deterministic: the same run gives the same answers and judgments.
    again = run_mtbench(model, tokenizer, run_cfg(LOCAL_JUDGE, limit=3), tmp_path / "again")
    assert again == result
    assert (tmp_path / "again" / "predictions" / "mtbench.jsonl").read_text() == (
        tmp_path / "predictions" / "mtbench.jsonl"
    ).read_text()


def trained_judge(prompts: list[str], verdict: str):
    """A tiny model taught to answer every one of ``prompts`` with ``verdict`` (then EOS)."""
    torch.manual_seed(0)
    model, tokenizer = build_model("tiny_llama")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    target = tokenizer(verdict)["input_ids"] + [tokenizer.eos_token_id]
    for _ in range(40):
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            loss = model(input_ids=torch.tensor([ids + target]), labels=torch.tensor([[-100] * len(ids) + target])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), tokenizer


@pytest.mark.slow  # training the judge on ~1300-token prompts: minutes on a loaded 2-core machine
def test_local_judge_ratings_are_parsed_from_a_local_model(tmp_path):
    """A tiny local judge trained to rate 7 grades real candidate answers: every turn rated, score exactly 7."""
    candidate, tokenizer = build_model("tiny_mistral")
    questions = load_questions(DATA / QUESTIONS_FILE)[5:7]  # reasoning and math: reference prompts
    answers = answer_questions(candidate, tokenizer, questions, max_new_tokens=6, batch_size=4)
    requests = [request for q, a in zip(questions, answers, strict=True) for _, request in judge_requests(q, a)]
    judge_model, judge_tokenizer = trained_judge([render_request(tokenizer, r) for r in requests], "Rating: [[7]]")
    judge = LocalJudge(judge_model, judge_tokenizer, "tiny_llama", max_tokens=24, batch_size=4, stop=rating_complete)
    records = grade(questions, answers, judge)
    assert [r["ratings"] for r in records] == [[7.0, 7.0]] * 2
    assert all(j.endswith("Rating: [[7]]") for r in records for j in r["judgments"])
    assert score(records)["score"] == 7.0 and score(records)["categories"] == {"reasoning": 7.0, "math": 7.0}


def test_local_judge_renders_with_the_chat_template_without_a_second_bos():
    _, tokenizer = build_model("tiny_llama")
    request = JudgeRequest("SYSTEM", "USER")
    assert render_request(tokenizer, request) == build_prompt("SYSTEM\n\nUSER")  # no chat template: Alpaca
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<a>"
    assert render_request(tokenizer, request) == "<s><system>SYSTEM<user>USER<a>"  # the tokenizer adds no BOS
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tokenizer("")["input_ids"] == [1]
    assert render_request(tokenizer, request) == "<system>SYSTEM<user>USER<a>"  # it does: the template's is dropped


# --- the OpenAI-compatible judge -----------------------------------------------------------------------------------


class StubServer:
    """A chat-completions stub on 127.0.0.1: records every request; ``replies`` is a list of (status, body) to
    answer with in turn (the last one repeats)."""

    def __init__(self, replies):
        self.replies, self.seen = list(replies), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, reply = stub.replies.pop(0) if len(stub.replies) > 1 else stub.replies[0]
                payload = json.dumps(reply(body) if callable(reply) else reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def completion(text: str) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
    }


def rate_by_question(body: dict) -> dict:
    """Rates 4 when the judged conversation has the word 'alpha', else answers without a rating."""
    return completion("Good.\nRating: [[4]]" if "alpha" in body["messages"][1]["content"] else "I cannot rate this.")


def test_openai_judge_request_format_auth_and_ratings(tmp_path, monkeypatch):
    monkeypatch.setenv("S2FT_TEST_JUDGE_KEY", "sk-test-123")
    questions = [Question(1, "writing", ("alpha q", "alpha r")), Question(2, "math", ("beta q", "beta r"), ("4", "5"))]
    with StubServer([(200, rate_by_question)]) as stub:
        judge = build_judge(
            {
                "kind": "openai",
                "max_tokens": 321,
                "openai": {"base_url": stub.url + "/", "model": "judge-model", "api_key_env": "S2FT_TEST_JUDGE_KEY"},
            }
        )
        assert judge.name == "openai:judge-model"
        records = grade(questions, [("a1", "a2"), ("b1", "b2")], judge)
    assert [r["ratings"] for r in records] == [[4.0, 4.0], [None, None]]
    assert records[1]["rating_errors"] == ["no [[rating]] in the judgment"] * 2
    assert len(stub.seen) == 4
    first = stub.seen[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == "Bearer sk-test-123"
    assert first["headers"]["Content-Type"] == "application/json"
    expected = judge_requests(questions[0], ("a1", "a2"))[0][1]
    assert first["body"] == {
        "model": "judge-model",
        "messages": [{"role": "system", "content": expected.system}, {"role": "user", "content": expected.user}],
        "temperature": 0,
        "max_tokens": 321,
    }
    assert stub.seen[3]["body"]["messages"][0]["content"] == JUDGE_PROMPTS["single-math-v1-multi-turn"][0]


def test_openai_judge_without_key_sends_no_auth_header_and_retries_server_errors():
    overloaded = (503, {"error": "busy"})
    with StubServer([overloaded, (429, {"error": "slow down"}), (200, completion("[[9]]"))]) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key=None, retries=2, retry_sleep_s=0.01, timeout_s=5)
        assert judge.judge([JudgeRequest("s", "u")]) == ["[[9]]"]
    assert len(stub.seen) == 3 and all("Authorization" not in seen["headers"] for seen in stub.seen)


@pytest.mark.parametrize(
    ("replies", "message"),
    [
        ([(401, {"error": "bad key"})], r"answered HTTP 401: .*bad key"),
        ([(503, {"error": "busy"})], r"answered HTTP 503"),  # retries used up
        ([(200, {"result": "not chat"})], r"did not answer in the chat-completions format"),
        ([(200, completion(None))], r"returned no text content"),
    ],
)
def test_openai_judge_errors_are_clear(replies, message):
    with StubServer(replies) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key="k", retries=1, retry_sleep_s=0.01, timeout_s=5)
        with pytest.raises(JudgeError, match=message):
            judge.judge([JudgeRequest("s", "u")])
    assert len(stub.seen) == (2 if "503" in message else 1)


def test_openai_judge_unreachable_endpoint():
    with StubServer([(200, completion("x"))]) as stub:
        url = stub.url  # a port that was just free and is closed again below
    judge = OpenAIJudge(url, "m", retries=1, retry_sleep_s=0.01, timeout_s=2)
    with pytest.raises(JudgeError, match=r"unreachable after 2 attempts.*eval.mtbench.judge.openai.base_url"):
        judge.judge([JudgeRequest("s", "u")])


# --- runs --------------------------------------------------------------------------------------------------------


def run_py(*overrides, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(env or {})}
    command = [sys.executable, "run.py", *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_instruct_mistral_without_a_judge_key_stops_before_anything_runs(tmp_path, monkeypatch):
    from s2ft.lightning import run_experiment
    from s2ft.run_config import RunConfigError

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = compose_run("+experiment=instruct_mistral")
    assert cfg["eval"]["mtbench"]["judge"]["kind"] == "openai"
    assert cfg["eval"]["mtbench"]["judge"]["openai"]["model"] == "gpt-4"
    # validate_run_config reports it with every other problem of the config.
    with pytest.raises(RunConfigError, match="eval.mtbench: the judge's API key variable OPENAI_API_KEY is not set"):
        run_experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_instruct_mistral_smoke_run_with_local_judge_writes_the_mtbench_summary(tmp_path):
    """`run.py +experiment=instruct_mistral debug=smoke` with a local judge and local training data (Alpaca-GPT4
    needs the hub): the MT-Bench fields land in summary.json, predictions/ and metrics.csv."""
    done = run_py(
        "+experiment=instruct_mistral",
        "debug=smoke",
        "data.train=[boolq]",
        "eval.mtbench.judge.kind=local",
        "eval.mtbench.judge.local.model=tiny_qwen2",
        "eval.mtbench.judge.max_tokens=4",
        f"hydra.run.dir={tmp_path}",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    mtbench = summary["mtbench"]
    assert summary["experiment"] == "instruct_mistral" and summary["model"] == "tiny_llama"
    assert (mtbench["n_questions"], mtbench["missing_ratings"], mtbench["judge"]) == (4, 8, "local:tiny_qwen2")
    assert mtbench["questions"] == str(DATA / QUESTIONS_FILE) and len(mtbench["ratings"]) == 4
    assert set(summary["heldout"]) == {"gsm8k_test", "commonsense_test"}
    lines = (tmp_path / "predictions" / "mtbench.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["rating_errors"] == ["no [[rating]] in the judgment"] * 2
    assert flat_metrics(summary)["mtbench/missing_ratings"] == 8  # what the runner logs at the end


def test_before_after_and_eval_mode_record_mtbench(tmp_path, monkeypatch):
    """In process: training with eval.before=true scores the untrained and the trained model; mode=eval on the
    finished run gives the trained model's answers again."""
    from s2ft.lightning import run_experiment

    common = [
        "debug=smoke",
        "logger=none",
        "eval=mtbench",
        "eval.limit=2",
        "eval.mtbench.judge.local.model=tiny_qwen2",
        "eval.mtbench.judge.max_tokens=4",
    ]
    train = compose_run(*common, "eval.before=true")
    again = compose_run(*common, "mode=eval", f"run_dir={tmp_path}/run")
    summary = run_experiment(train, tmp_path / "run")
    for key in ("mtbench", "mtbench_before"):
        assert (summary[key]["n_questions"], summary[key]["missing_ratings"]) == (2, 4)
    before = (tmp_path / "run" / "before" / "predictions" / "mtbench.jsonl").read_text().splitlines()
    after = (tmp_path / "run" / "predictions" / "mtbench.jsonl").read_text()
    assert [json.loads(line)["question_id"] for line in before] == list(map(int, summary["mtbench"]["ratings"]))
    evaluated = run_experiment(again, tmp_path / "eval")
    assert evaluated["train"] is None and evaluated["mtbench"]["ratings"] == summary["mtbench"]["ratings"]
    assert (tmp_path / "eval" / "predictions" / "mtbench.jsonl").read_text() == after


def test_chat_template_conversation_continues_the_chat():
    _, tokenizer = build_model("tiny_llama")
    turns = ["First?", "Second?"]
    with pytest.raises(MTBenchError, match="need a tokenizer that has one"):
        conversation_prompt(turns, [], "chat", tokenizer)
    with pytest.raises(MTBenchError, match="unknown prompt template 'vicuna'"):
        conversation_prompt(turns, [], "vicuna", tokenizer)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert conversation_prompt(turns, [], "chat", tokenizer) == "<user>First?<assistant>"
    assert (
        conversation_prompt(turns, ["One."], "chat", tokenizer) == "<user>First?<assistant>One.<user>Second?<assistant>"
    )
    assert conversation_prompt(turns, ["One."]) == build_prompt("First?") + "One." + SECOND_TURN.format(
        instruction="Second?"
    )


def test_mtbench_turns_holding_a_special_token_are_refused_before_any_answer(tmp_path):
    """Before, no check read the MT-Bench questions: a user's question file with "</s>" in a turn was answered as if
    the turn ended there."""
    questions = tmp_path / "question.jsonl"
    rows = [
        {"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
        {"question_id": 2, "category": "coding", "turns": ["Parse <s>bold</s> tags.", "Now in C."]},
    ]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = {"eval": {"mtbench": {"questions": str(questions)}}, "paths": {"data_dir": str(DATA)}, "seed": 0}
    (problem,) = special_token_check(tiny_tokenizer(), cfg)
    assert problem.startswith(
        f"eval.mtbench questions {questions}: 1 item(s) hold the tokenizer's special token(s) </s>, <s> in their "
        "text: 2 (turn 1)."
    )
    shipped = {"eval": {"mtbench": {"questions": None}}, "paths": {"data_dir": str(DATA)}, "seed": 0}
    assert special_token_check(tiny_tokenizer(), shipped) == []
