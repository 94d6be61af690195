"""The chat template of SwitchLM (data/chat.py) and training on conversations (``objective=chat``):
the template's text and tokens, the loss mask (assistant contents and their ``</s>`` only), every
bad input named by place and ``file:line``, rows and batches, and a run through the CLI on a
synthetic task a tiny model learns in seconds (sums of two digits, words echoed in capitals)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchformer.cli import main
from switchformer.data.chat import ROLES, check_messages, encode_chat, prompt_messages, render_chat
from switchformer.data.files import DataError
from switchformer.data.loaders import load_conversations, load_text
from switchformer.data.tokenizer import special_ids, train_tokenizer
from switchformer.inference.text import generate_text
from switchformer.models.lm import next_token_labels
from switchformer.train.data import Split, evaluation_split, prepare_data, split_from_documents
from switchformer.train.evaluation import scored_tokens
from switchformer.train.run import load_run
from switchformer.train.sources import build_config
from switchformer.train.trainer import Trainer

pytestmark = [pytest.mark.slow]

WORDS = "apple river stone cloud tiger lemon piano rocket garden silver".split()
TINY = ["--set", "d_model=64", "--set", "d_ff=128", "--set", "num_heads=2", "--set", "vocab_size=400"]
TINY += ["--set", "seq_len=48", "--set", "batch_size=16", "--set", "warmup_steps=10", "--set", "log_every=10"]
TINY += ["--set", "eval_every=1000", "--set", "checkpoint_every=1000", "--set", "sample_tokens=8"]


def synthetic_conversations(n: int, seed: int) -> list[dict]:
    """Rows ``{"messages": [...]}``: "what is A plus B" answered with the sum, or "say WORD" (after a
    system message) answered with the word in capitals."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            messages = [
                {"role": "user", "content": f"what is {a} plus {b}"},
                {"role": "assistant", "content": str(a + b)},
            ]
        else:
            word = rng.choice(WORDS)
            messages = [
                {"role": "system", "content": "Answer in capitals."},
                {"role": "user", "content": f"say {word}"},
                {"role": "assistant", "content": word.upper()},
            ]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), "utf-8")
    return path


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5, of course\nsecond line"},
]


@pytest.fixture(scope="module")
def tok():
    texts = [render_chat(row["messages"], False) for row in synthetic_conversations(200, seed=1)]
    texts += [render_chat(CONVERSATION, False)] * 5
    return train_tokenizer(texts, vocab_size=400)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids if text else []


# ----------------------------------------------------------------------------- the template


def test_render_chat_is_the_documented_template():
    expected = (
        "<|system|>\nBe brief.</s>\n"
        "<|user|>\nHi there</s>\n"
        "<|assistant|>\nHello.</s>\n"
        "<|user|>\nWhat is 2 plus 3?</s>\n"
        "<|assistant|>\n5, of course\nsecond line</s>\n"
    )
    assert render_chat(CONVERSATION, False) == expected
    assert render_chat(CONVERSATION, True) == expected + "<|assistant|>\n"
    assert render_chat([{"role": "user", "content": ""}], True) == "<|user|>\n</s>\n<|assistant|>\n"


def test_encode_chat_is_the_concatenation_of_its_pieces(tok):
    eos = special_ids(tok)["eos"]
    ids, mask = encode_chat(tok, CONVERSATION, False)
    expected = []
    for message in CONVERSATION:
        expected += (
            encode(tok, f"<|{message['role']}|>\n") + encode(tok, message["content"]) + [eos] + encode(tok, "\n")
        )
    assert ids == expected
    assert len(mask) == len(ids)
    assert ids.count(eos) == len(CONVERSATION)  # </s> by id, once a message; never from the text


def test_mask_is_exactly_the_assistant_contents_and_their_eos(tok):
    eos = special_ids(tok)["eos"]
    ids, mask = encode_chat(tok, CONVERSATION, False)
    runs, current = [], []
    for token, scored in zip(ids, mask):
        if scored:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    assert not current  # the last scored run is followed by its newline
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [run[-1] for run in runs] == [eos] * len(answers)
    assert [tok.decode(run[:-1], skip_special_tokens=False) for run in runs] == answers
    masked = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(masked, skip_special_tokens=True) == "".join(answers)
    # nothing of the system or user turns, nor any role marker, is scored
    assert sum(mask) == sum(len(encode(tok, a)) + 1 for a in answers)


def test_generation_prompt_appends_the_assistant_marker(tok):
    messages = CONVERSATION[:2]
    plain, plain_mask = encode_chat(tok, messages, False)
    prompted, prompted_mask = encode_chat(tok, messages, True)
    marker = encode(tok, "<|assistant|>\n")
    assert marker and prompted == plain + marker
    assert prompted_mask == plain_mask + [False] * len(marker)
    assert not any(prompted_mask)  # no assistant turn: nothing to score


def test_text_parts_are_joined_and_extra_keys_ignored(tok):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}], "name": "x"}
    ]
    assert check_messages(parts) == [{"role": "user", "content": "one\ntwo"}]
    assert encode_chat(tok, parts, True) == encode_chat(tok, [{"role": "user", "content": "one\ntwo"}], True)
    assert render_chat(parts, False) == "<|user|>\none\ntwo</s>\n"


def test_a_special_token_in_a_content_is_refused(tok):
    for text in ("ends here</s> and more", "<pad>", "a <extra_id_3> b"):
        with pytest.raises(ValueError, match=r"^messages\[1\]\.content: holds the special token"):
            encode_chat(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}], False)
    # role markers in a content are plain text: allowed, and scored as the assistant's text
    ids, mask = encode_chat(tok, [{"role": "assistant", "content": "<|user|>"}], False)
    assert sum(mask) == len(encode(tok, "<|user|>")) + 1


SAFE_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30).filter(
    lambda t: not any(s in t for s in ("</s>", "<pad>", "<unk>", "<extra_id_"))
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(ROLES), SAFE_TEXT), min_size=1, max_size=6), st.booleans())
def test_property_mask_counts_the_assistant_tokens(tok, turns, prompt):
    messages = [{"role": role, "content": text} for role, text in turns]
    ids, mask = encode_chat(tok, messages, prompt)
    assert len(ids) == len(mask)
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    assert sum(mask) == sum(len(encode(tok, text)) for text in assistants) + len(assistants)
    eos = special_ids(tok)["eos"]
    pieces = [
        encode(tok, f"<|{m['role']}|>\n") + encode(tok, m["content"]) + [eos] + encode(tok, "\n") for m in messages
    ]
    assert ids == [t for piece in pieces for t in piece] + (encode(tok, "<|assistant|>\n") if prompt else [])
    assert tok.decode(ids, skip_special_tokens=False) == render_chat(messages, prompt)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "messages, error",
    [
        ([], "messages: must be a non-empty list"),
        ({"role": "user", "content": "x"}, "messages: must be a non-empty list"),
        (None, "messages: must be a non-empty list"),
        (["hello"], "messages[0]: must be an object with 'role' and 'content', got str"),
        ([{"content": "x"}], "messages[0]: missing field 'role'"),
        ([{"role": "user"}], "messages[0]: missing field 'content'"),
        (
            [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}, {"role": "bot", "content": "z"}],
            "messages[2].role: must be one of 'system', 'user', 'assistant', got 'bot'",
        ),
        ([{"role": 3, "content": "x"}], "messages[0].role: must be one of 'system', 'user', 'assistant', got 3"),
        (
            [{"role": "Assistant", "content": "x"}],
            "messages[0].role: must be one of 'system', 'user', 'assistant', got 'Assistant'",
        ),
        ([{"role": "user", "content": 5}], "messages[0].content: must be a string (or a list of text parts), got int"),
        (
            [{"role": "user", "content": None}],
            "messages[0].content: must be a string (or a list of text parts), got null",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0].type: only 'text' parts are supported, got 'image_url'",
        ),
        (
            [{"role": "user", "content": [{"text": "x"}]}],
            "messages[0].content[0].type: only 'text' parts are supported, got missing",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 1}]}],
            "messages[0].content[0].text: must be a string, got int",
        ),
        ([{"role": "user", "content": ["x"]}], "messages[0].content[0]: must be a part object"),
    ],
)
def test_check_messages_names_the_place(tmp_path, messages, error):
    with pytest.raises(ValueError) as info:
        check_messages(messages)
    assert str(info.value).startswith(error) and "\n" not in str(info.value)
    # the loader says the same, after the file and line
    path = write_jsonl(tmp_path / "chats.jsonl", synthetic_conversations(2, 0) + [{"messages": messages}])
    with pytest.raises(DataError) as info:
        load_conversations([path])
    assert str(info.value).startswith(f"{path}:3: {error}")


def test_loader_errors_name_file_and_line(tmp_path):
    good = synthetic_conversations(1, 0)
    cases = [
        ([*good, "{not json"], r"chats\.jsonl:2: invalid JSON"),
        ([*good, '["a"]'], r"chats\.jsonl:2: expected a JSON object"),
        ([*good, {"text": "hello"}], r"chats\.jsonl:2: missing field 'messages'"),
        (
            [*good, *good, {"messages": [{"role": "user", "content": "hi"}]}],
            r"chats\.jsonl:3: messages: no 'assistant' message",
        ),
    ]
    for rows, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            load_conversations([write_jsonl(tmp_path / "chats.jsonl", rows)])
    (tmp_path / "chats.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"chats\.txt: the chat objective reads conversations from JSONL"):
        load_conversations([tmp_path / "chats.txt"])
    # blank lines are skipped and the line numbers stay the editor's
    path = write_jsonl(tmp_path / "chats.jsonl", [*good, "", *good])
    assert [c.where for c in load_conversations([path])] == [f"{path}:1", f"{path}:3"]


def test_a_special_token_in_training_data_is_named_by_line(tmp_path, tok):
    rows = synthetic_conversations(3, 0)
    rows[2]["messages"][-1]["content"] = "done</s>"
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    config = chat_config(data=[str(path)])
    with pytest.raises(DataError, match=r"chats\.jsonl:3: messages\[2\]\.content: holds the special token '</s>'"):
        split_from_documents(tok, load_conversations([path]), config, 0)


def test_chat_rows_without_the_chat_objective_say_what_to_set(tmp_path, capsys):
    path = write_jsonl(tmp_path / "chats.jsonl", synthetic_conversations(4, 0))
    with pytest.raises(DataError, match=r"chats\.jsonl:1: missing field 'text' .*--set objective=chat"):
        load_text([path])
    args = ["train", "--preset", "test", "--model", "lm", "--data", str(path), "--no-progress"]
    assert main([*args, "--out-dir", str(tmp_path / "runs")]) != 0
    err = capsys.readouterr().err
    assert "chats.jsonl:1: missing field 'text'" in err and "--set objective=chat" in err


def test_config_accepts_chat_for_lm_only():
    assert build_config("test", sets=["objective=chat"]).resolved_objective == "chat"
    with pytest.raises(ValueError, match=r"objective: 'chat' trains the decoder-only lm model"):
        build_config("test", sets=["model=t5", "objective=chat"])
    with pytest.raises(ValueError, match=r"objective: the lm model trains with 'causal' or 'chat'"):
        build_config("test", sets=["objective=seq2seq"])


# ----------------------------------------------------------------------------- rows and batches


def chat_config(**overrides):
    values = dict(objective="chat", seq_len=48, vocab_size=400, max_steps=8, eval_every=4, log_every=1)
    values.update(overrides)
    return build_config("test", overrides=values)


def expected_labels(tok, messages, width: int) -> list[int]:
    ids, mask = encode_chat(tok, messages, False)
    labels = [t if m else -100 for t, m in zip(ids, mask)][:width]
    labels[0] = -100  # nothing predicts the first position
    return labels


def test_rows_score_the_assistant_tokens_only(tmp_path, tok):
    rows = synthetic_conversations(20, 3)
    rows.append({"messages": CONVERSATION})
    rows.append({"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "ok"}]})
    conversations = load_conversations([write_jsonl(tmp_path / "chats.jsonl", rows)])
    config = chat_config(seq_len=24)
    split = split_from_documents(tok, conversations, config, 0)
    assert split.aligned_labels
    pad = special_ids(tok)["pad"]
    long = 0
    for i, conversation in enumerate(conversations):
        ids, _ = encode_chat(tok, conversation.messages, False)
        long += len(ids) > config.seq_len
        n = min(len(ids), config.seq_len)
        row = {k: v[i] for k, v in split.tensors.items()}
        assert row["input_ids"][:n].tolist() == ids[:n]
        assert (row["input_ids"][n:] == pad).all()
        assert row["attention_mask"].tolist() == [1] * n + [0] * (row["attention_mask"].numel() - n)
        labels = expected_labels(tok, conversation.messages, config.seq_len)
        assert row["labels"].tolist() == labels + [-100] * (row["labels"].numel() - n)
    assert long and split.truncated_conversations == long  # CONVERSATION is longer than 24 tokens
    assert split.tensors["input_ids"].shape[1] <= config.seq_len


def test_changing_user_and_system_text_changes_no_scored_label(tmp_path, tok):
    """Metamorphic: another question (or system message) moves the answer but leaves its labels."""
    config = chat_config(seq_len=64)
    rng = random.Random(5)
    for row in synthetic_conversations(30, 7):
        messages = row["messages"]
        changed = [
            dict(
                m,
                content=m["content"] if m["role"] == "assistant" else " ".join(rng.choices(WORDS, k=rng.randint(0, 4))),
            )
            for m in messages
        ]
        labels = [
            split_from_documents(
                tok, load_conversations([write_jsonl(tmp_path / "c.jsonl", [{"messages": m}])]), config, 0
            ).tensors["labels"][0]
            for m in (messages, changed)
        ]
        assert labels[0][labels[0] != -100].tolist() == labels[1][labels[1] != -100].tolist()
        answer = [m["content"] for m in messages if m["role"] == "assistant"]
        assert tok.decode(labels[0][labels[0] != -100].tolist(), skip_special_tokens=True) == "".join(answer)


def test_batches_keep_labels_as_wide_as_inputs_and_count_scored_tokens_exactly(tmp_path, tok):
    rows = synthetic_conversations(12, 2) + [{"messages": CONVERSATION}]
    conversations = load_conversations([write_jsonl(tmp_path / "chats.jsonl", rows)])
    split = split_from_documents(tok, conversations, chat_config(seq_len=64), 0)
    index = torch.tensor([0, 1, 2])  # short rows: the batch is narrower than the split
    batch = split.rows(index)
    width = int(split.tensors["attention_mask"][index].sum(1).max())
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] == width < split.tensors["input_ids"].shape[1]
    # every label kept is one the model scores (its shift, its mask): scored_tokens is exact
    shifted = next_token_labels(batch["labels"], batch["attention_mask"])
    assert scored_tokens(batch) == int((shifted != -100).sum()) == int((batch["labels"] != -100).sum())
    full = split.rows(torch.arange(len(split)))
    assert scored_tokens(full) == int((next_token_labels(full["labels"], full["attention_mask"]) != -100).sum())


def test_training_step_counts_each_input_token_once(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", synthetic_conversations(40, 0))
    trainer = Trainer(chat_config(data=[str(path)], max_steps=1), tmp_path / "run", progress=False)
    batch = trainer.data.batch(trainer.config, 0, 0)
    assert trainer.train_step()["tokens"] == batch["input_ids"].numel()
    trainer.close()


def _first_step_gradient(tmp_path, path, name, batch_size, grad_accum) -> dict[str, torch.Tensor]:
    config = build_config(
        "test",
        overrides=dict(
            objective="chat",
            data=[str(path)],
            seq_len=48,
            vocab_size=400,
            d_model=16,
            num_layers=2,
            num_heads=2,
            d_ff=16,
            num_experts=2,
            sparse_step=1,
            precision="fp32",
            batch_size=batch_size,
            grad_accum=grad_accum,
            grad_clip=1e9,
            max_steps=1,
            aux_loss_coef=0.0,
            z_loss_coef=0.0,
        ),  # fmt: skip
        sets=["capacity_factor=none", "eval_capacity_factor=none"],
    )
    trainer = Trainer(config, tmp_path / name, progress=False)
    seen = {}
    trainer.optimizer.step = lambda: seen.update(
        {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    )
    assert trainer.train_step() is not None
    trainer.close()
    return seen


def test_gradient_is_the_mean_over_every_assistant_token_however_the_batch_is_split(tmp_path):
    rows = synthetic_conversations(40, 4)
    rows[10]["messages"][-1]["content"] = "A much longer answer than the others, " * 2  # uneven answers
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    whole = _first_step_gradient(tmp_path, path, "whole", 4, 1)
    for batch_size, grad_accum in ((1, 4), (2, 2)):
        split = _first_step_gradient(tmp_path, path, f"split{grad_accum}", batch_size, grad_accum)
        assert split.keys() == whole.keys()
        for name, grad in whole.items():
            scale = grad.abs().max().clamp_min(1e-12)
            assert ((split[name] - grad).abs().max() / scale).item() < 1e-4, (name, batch_size, grad_accum)


def test_valid_files_are_the_validation_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_conversations(30, 0))
    valid = write_jsonl(tmp_path / "valid.jsonl", synthetic_conversations(7, 9))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    data = prepare_data(chat_config(data=[str(train)], valid_data=[str(valid)]), tmp_path / "a")
    assert (len(data.train), len(data.valid)) == (30, 7)
    assert data.sample_messages == prompt_messages(load_conversations([valid])[0].messages)
    carved = prepare_data(chat_config(data=[str(train)], validation_fraction=0.2), tmp_path / "b")
    assert (len(carved.train), len(carved.valid)) == (24, 6)  # the first fifth holds out
    assert carved.sample_messages == prompt_messages(load_conversations([train])[0].messages)
    assert isinstance(carved.valid, Split) and carved.valid.aligned_labels


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    """A chat run trained through the CLI on 400 synthetic conversations (a few seconds)."""
    root = tmp_path_factory.mktemp("chat")
    data = write_jsonl(root / "chats.jsonl", synthetic_conversations(400, 0))
    args = ["train", "--preset", "test", "--model", "lm", "--set", "objective=chat", "--data", str(data)]
    args += [*TINY, "--max-steps", "200", "--no-progress", "--out-dir", str(root), "--run-name", "run"]
    assert main(args) == 0
    return root / "run"


def test_training_on_conversations_learns(chat_run):
    records = [json.loads(line) for line in (chat_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["ce_loss"] for r in records if "ce_loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    summary = json.loads((chat_run / "summary.json").read_text())
    assert summary["eval_loss"] < 1.0
    assert summary["truncated"]["training"] == {"conversations": 0, "rows": 360}
    config = json.loads((chat_run / "config.json").read_text())["train"]
    assert config["objective"] == "chat"


def test_the_run_loss_is_on_assistant_tokens_only(chat_run):
    """The model's loss on the run's validation rows equals the cross-entropy computed by hand over
    the positions that predict an assistant token, and only those."""
    model, tok, config = load_run(chat_run)
    split = evaluation_split(config, tok)
    batch = split.rows(torch.arange(8))
    model.eval()
    with torch.no_grad():
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    conversations = load_conversations(config.data)[: len(split)]  # the carved validation conversations
    losses = []
    for i in range(8):
        ids, mask = encode_chat(tok, conversations[i].messages, False)
        for t in range(1, len(ids)):
            if mask[t]:
                losses.append(F.cross_entropy(logits[i, t - 1].float(), torch.tensor(ids[t])))
    assert len(losses) == scored_tokens(batch)
    torch.testing.assert_close(out.ce_loss.float(), torch.stack(losses).mean(), rtol=1e-4, atol=1e-5)


def test_generate_on_a_chat_run_prints_the_answer_only(chat_run, capsys):
    assert main(["generate", str(chat_run), "--prompt", "say tiger", "--greedy", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out == "TIGER\n"
    model, tok, config = load_run(chat_run)
    for word in ("apple", "piano"):
        answer = generate_text(model, tok, f"say {word}", 8, do_sample=False, config=config)
        assert answer == word.upper()
    # the conversation form: a system message too, as training saw it
    messages = [{"role": "system", "content": "Answer in capitals."}, {"role": "user", "content": "say stone"}]
    assert generate_text(model, tok, "", 8, do_sample=False, config=config, messages=messages) == "STONE"


def test_the_end_of_run_sample_answers_the_first_validation_prompt(chat_run):
    model, tok, config = load_run(chat_run)
    summary = json.loads((chat_run / "summary.json").read_text())
    first = load_conversations(config.data)[0].messages
    expected = generate_text(
        model, tok, config.sample_prompt, config.sample_tokens, seed=config.seed, config=config,
        messages=prompt_messages(first),
    )  # fmt: skip
    assert summary["sample"] == expected
    assert "<|" not in summary["sample"]


def test_eval_scores_a_chat_run(chat_run, tmp_path, capsys):
    assert main(["eval", str(chat_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((chat_run / "summary.json").read_text())
    assert result["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    data = write_jsonl(tmp_path / "test.jsonl", synthetic_conversations(10, 42))
    assert main(["eval", str(chat_run), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] < 2.0


@pytest.mark.parametrize(
    "row, objective, where",
    [
        ({"text": "bad \ud800 text"}, None, "field 'text': not valid Unicode"),
        ({"messages": [{"role": "user", "content": "hi \udfff"}, {"role": "assistant", "content": "ok"}]}, "chat",
         "messages[0].content: not valid Unicode"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]},
                       {"role": "assistant", "content": "ok"}]}, "chat", "messages[0].content: not valid Unicode"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_in_jsonl_training_data_is_named_at_its_line(row, objective, where, tmp_path, capsys):
    """JSON's \\ud800 escapes make strings no tokenizer reads: every JSONL reader names the file and line."""
    import json

    from switchformer.cli import main

    good = {"text": "fine text"} if objective is None else {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")  # json.dumps escapes the surrogate
    args = ["train", "--preset", "test", "--model", "lm", "--data", str(data), "--max-steps", "1", "--no-progress",
            "--out-dir", str(tmp_path / "runs")]  # fmt: skip
    if objective:
        args += ["--set", f"objective={objective}"]
    assert main(args) == 2
    assert f"data.jsonl:2: {where}" in capsys.readouterr().err


def test_a_lone_surrogate_in_a_pair_is_named_at_its_line(tmp_path):
    import json

    from switchformer.data.files import DataError
    from switchformer.data.pairs import load_pairs

    data = tmp_path / "pairs.jsonl"
    rows = [{"source": "ok", "target": "ok"}, {"source": "a\ud800", "target": "b"}]
    data.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(DataError, match="pairs.jsonl:2: field 'source': not valid Unicode"):
        load_pairs([data], None, None)
