"""Log-likelihood scoring on the tiny Llama against brute-force references."""

import math

import pytest
import torch

from expert.evaluation.forwards import mask_kind as real_mask_kind
from expert.evaluation.scoring import encode_questions, model_max_length, one_pass, score_questions
from tests.expert.eval_fixtures import loaded, llama_dir, mmlu_frame, pubmedqa_frame  # noqa: F401

LETTERS = [" A", " B", " C", " D"]


def brute_force(model, tokenizer, context: str, choice: str, max_length: int = 10**9) -> float:
    """One full forward per choice over the untruncated-or-cut text, summing token log-probs one by one."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + choice)
    cont = whole[len(ctx):]
    tokens = (ctx + cont)[-(max_length + 1):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    total = 0.0
    for j, token in enumerate(cont):
        position = len(tokens) - 1 - len(cont) + j  # the logit row that predicts cont[j]
        total += float(logprobs[position, token])
    return total


def test_encoding_moves_trailing_space_into_the_continuation(loaded):
    tok = loaded.tokenizer
    with_space = encode_questions(tok, ["Answer: "], [["yes"]])[0]
    without = encode_questions(tok, ["Answer:"], [[" yes"]])[0]
    assert with_space == without
    assert without.context == tok.encode("Answer:")
    assert without.context + without.choices[0] == tok.encode("Answer: yes")


def test_no_bos_is_added_where_the_tokenizer_adds_none(loaded):
    q = encode_questions(loaded.tokenizer, ["Answer:"], [[" yes"]])[0]
    assert loaded.tokenizer.bos_token_id not in q.context


@pytest.mark.parametrize("choices", [[" yes", " no", " maybe"], [" yes", " xyzzy qq", " no plugh"]])
def test_choice_scores_match_brute_force(loaded, choices):
    prompts = pubmedqa_frame()["prompt"].tolist()[:4]
    questions = encode_questions(loaded.tokenizer, prompts, [choices] * len(prompts))
    assert all(one_pass(q) for q in questions) == all(len(loaded.tokenizer.encode(c)) == 1 for c in choices)
    got = score_questions(loaded.model, questions, max_length=256, batch_size=3)
    for prompt, row in zip(prompts, got):
        want = [brute_force(loaded.model, loaded.tokenizer, prompt, c) for c in choices]
        assert row == pytest.approx(want, abs=1e-4)


def test_mmlu_one_pass_equals_four_full_passes(loaded):
    prompts = mmlu_frame(2)["prompt"].tolist()
    questions = encode_questions(loaded.tokenizer, prompts, [LETTERS] * len(prompts))
    assert all(one_pass(q) for q in questions), "each letter with its space should be one token"
    got = score_questions(loaded.model, questions, max_length=256, batch_size=4)
    for prompt, row in zip(prompts, got):
        assert row == pytest.approx([brute_force(loaded.model, loaded.tokenizer, prompt, c) for c in LETTERS],
                                    abs=1e-4)


def test_left_truncation_matches_lm_eval(loaded):
    prompt = pubmedqa_frame()["prompt"].iloc[1]
    short = 12
    assert len(loaded.tokenizer.encode(prompt)) > short
    for choices in ([" yes", " no"], [" xyzzy", " no plugh"]):
        questions = encode_questions(loaded.tokenizer, [prompt], [choices])
        got = score_questions(loaded.model, questions, max_length=short)[0]
        assert got == pytest.approx([brute_force(loaded.model, loaded.tokenizer, prompt, c, short)
                                     for c in choices], abs=1e-4)


def test_prefix_cache_equals_uncached(loaded, monkeypatch):
    from expert.evaluation import forwards

    prefixes = []
    real = forwards.prefix_cache
    monkeypatch.setattr(forwards, "prefix_cache", lambda m, p, d, *a: prefixes.append(len(p)) or real(m, p, d, *a))
    frame = mmlu_frame(4)
    questions = encode_questions(loaded.tokenizer, frame["prompt"].tolist(), [LETTERS] * len(frame))
    groups = list(frame.groupby("subject", sort=False).indices.values())
    plain = score_questions(loaded.model, questions, max_length=256, batch_size=3)
    cached = score_questions(loaded.model, questions, max_length=256, batch_size=3, groups=groups)
    assert cached == [pytest.approx(row, abs=1e-4) for row in plain]
    assert len(prefixes) == len(groups) and min(prefixes) > 30  # one cached prefix per subject
    # Multi-token choices take the per-choice path, also through the cache.
    texts = [[" xyzzy", " B", " no plugh", " D"]] * len(frame)
    questions = encode_questions(loaded.tokenizer, frame["prompt"].tolist(), texts)
    plain = score_questions(loaded.model, questions, max_length=256, batch_size=5)
    cached = score_questions(loaded.model, questions, max_length=256, batch_size=5, groups=groups)
    assert cached == [pytest.approx(row, abs=1e-4) for row in plain]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("budget, row_tokens", [(80, 768), (240, 80), (96, 32)],
                         ids=["one-row", "three-rows", "wide-rows"])
def test_packed_suffixes_equal_padded_batches(loaded, monkeypatch, attention, budget, row_tokens):
    # Grouped questions run as packs: rows of several suffixes after the prefix cache, each
    # attending to the prefix and to itself only. Tiny budgets make several packs per subject
    # (suffixes here are 30-36 tokens): one row of 80 tokens; three rows of 80; rows of 32,
    # which every suffix overflows (each gets a wider row of its own). Multi-token choices put
    # several scored positions in a suffix.
    from expert.evaluation import forwards, scoring

    frame = mmlu_frame(4)
    groups = list(frame.groupby("subject", sort=False).indices.values())
    packs = []  # passes per row, per pack
    real = forwards.forward_packed
    monkeypatch.setattr(forwards, "forward_packed",
                        lambda m, rows, *a: packs.append([len(r) for r in rows]) or real(m, rows, *a))
    monkeypatch.setattr(scoring, "pack_tokens", lambda model: budget)
    monkeypatch.setattr(scoring, "ROW_TOKENS", row_tokens)
    monkeypatch.setattr(loaded.model.config, "_attn_implementation", attention)
    for texts in (LETTERS, [" xyzzy", " B", " no plugh", " D"]):
        questions = encode_questions(loaded.tokenizer, frame["prompt"].tolist(), [texts] * len(frame))
        monkeypatch.setattr(forwards, "mask_kind", lambda model: None)
        padded = score_questions(loaded.model, questions, max_length=256, batch_size=4, groups=groups)
        assert not packs
        monkeypatch.setattr(forwards, "mask_kind", real_mask_kind)
        packed = score_questions(loaded.model, questions, max_length=256, batch_size=4, groups=groups)
        assert sum(map(sum, packs)) == len(scoring_passes(questions)), packs  # each pass in one pack
        if row_tokens == 32:
            assert {n for rows in packs for n in rows} == {1}, packs
        else:
            assert max(n for rows in packs for n in rows) == 2, packs
            assert (max(map(len, packs)) > 1) == (row_tokens == 80), packs
        assert packed == [pytest.approx(row, abs=1e-4) for row in padded]
        packs.clear()


def scoring_passes(questions):
    from expert.evaluation.scoring import _make_passes

    return [p for i, q in enumerate(questions) for p in _make_passes(i, q, 256)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("row_tokens", [768, 50], ids=["one-row", "three-rows"])
def test_fixed_shapes_pad_packs_and_prefix_caches_without_changing_scores(loaded, monkeypatch, attention, row_tokens):
    # On a GPU every pack of a row width has the same rows, filled up to that width, and every
    # prefix cache is padded to a multiple of SHAPE_STEP (cuDNN attention plans once per shape).
    # The filler must change no score: the cache's filler slots are masked out for every token,
    # a row's filler is its own segment, and a pack's missing rows are all filler.
    import torch

    from expert.evaluation import forwards, scoring

    frame = mmlu_frame(4)
    groups = list(frame.groupby("subject", sort=False).indices.values())
    shapes, caches = set(), []
    real_forward, real_cache = forwards.forward_packed, forwards.prefix_cache

    def forward(model, rows, shape, cache, *rest):
        shapes.add((shape.cached, shape.width, shape.height, len(rows)))
        return real_forward(model, rows, shape, cache, *rest)

    def prefix_cache(model, prefix, device, length=None):
        cache = real_cache(model, prefix, device, length)
        caches.append((len(prefix), cache.get_seq_length()))
        return cache

    positions = []  # the highest position id of every forward
    hook = loaded.model.register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(int(kwargs["position_ids"].max()))
        if kwargs.get("position_ids") is not None else None, with_kwargs=True)
    monkeypatch.setattr(forwards, "forward_packed", forward)
    monkeypatch.setattr(forwards, "prefix_cache", prefix_cache)
    monkeypatch.setattr(scoring, "pack_tokens", lambda model: 150)  # one row: 3 + 1 questions
    monkeypatch.setattr(scoring, "ROW_TOKENS", row_tokens)  # 50: three rows of one question
    monkeypatch.setattr(scoring, "SHAPE_STEP", 64)
    monkeypatch.setattr(loaded.model.config, "_attn_implementation", attention)
    for texts in (LETTERS, [" xyzzy", " B", " no plugh", " D"]):
        questions = encode_questions(loaded.tokenizer, frame["prompt"].tolist(), [texts] * len(frame))
        exact = score_questions(loaded.model, questions, max_length=256, batch_size=4, groups=groups,
                                fixed_shapes=False)
        assert all(n == slots for n, slots in caches)
        caches.clear()
        shapes.clear()
        exact_top, positions[:] = max(positions), []
        fixed = score_questions(loaded.model, questions, max_length=256, batch_size=4, groups=groups,
                                fixed_shapes=True)
        assert fixed == [pytest.approx(row, abs=1e-4) for row in exact]
        assert all(not math.isnan(v) for row in fixed for v in row)
        assert all(slots % 64 == 0 and slots > n for n, slots in caches), caches
        assert {(width, height) for _, width, height, _ in shapes} == {(150, 1) if row_tokens == 768 else (50, 3)}
        assert any(real < height for *_, height, real in shapes) == (row_tokens == 50), shapes  # filler rows
        assert all(cached % 64 == 0 for cached, *_ in shapes), shapes
        # Filler never takes a position a real token would not: the highest stays the same.
        assert max(positions) == exact_top, (positions, exact_top)
        caches.clear()
        shapes.clear()
        positions.clear()
    # Nor does a padded cache run past the context window (a model with learned positions has
    # no slot there): with a window just over the longest input, the cache stops at the window.
    caches.clear()
    monkeypatch.setattr(scoring, "SHAPE_STEP", 100)  # prefixes of 93-108 tokens: one rounds to 200
    window = max(len(q.context) for q in questions) + 1
    score_questions(loaded.model, questions, max_length=window, groups=groups, fixed_shapes=True)
    assert all(slots <= window for _, slots in caches) and (max(n for n, _ in caches), window) in caches, \
        (caches, window)
    hook.remove()
    caches.clear()
    # Off a GPU the default is exact shapes (padding would only add work there).
    assert next(loaded.model.parameters()).device == torch.device("cpu")
    score_questions(loaded.model, questions[:4], max_length=256, groups=[[0, 1, 2, 3]])
    assert all(n == slots for n, slots in caches)


def test_pack_size_follows_the_model_shape(loaded):
    from types import SimpleNamespace

    from expert.evaluation.scoring import pack_tokens

    llama8b = SimpleNamespace(config=SimpleNamespace(hidden_size=4096, intermediate_size=14336))
    assert 2500 < pack_tokens(llama8b) < 3500
    smol = SimpleNamespace(config=SimpleNamespace(hidden_size=576, intermediate_size=1536))
    assert pack_tokens(smol) == 345
    assert pack_tokens(loaded.model) == 256  # tiny shapes: the floor


def test_prefix_cache_is_exact_when_the_text_prefix_is_not_a_token_prefix(loaded):
    # The cache splits at the group's common *token* prefix, never at the text prefix: here
    # the shared text ends inside the word " following", so the text split is no token split
    # (with SmolLM2's tokenizer the usual "\n\n" end of an MMLU prefix is such a case too).
    tok = loaded.tokenizer
    shared = mmlu_frame(1)["prefix"].iloc[0] + "Which of the follow"
    prompts = [shared + rest for rest in ("ing is a virus?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:",
                                          "ing is a prion?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")]
    assert tok.encode(shared) + tok.encode(prompts[0][len(shared):]) != tok.encode(prompts[0])
    questions = encode_questions(tok, prompts, [LETTERS] * 2)
    plain = score_questions(loaded.model, questions, max_length=256)
    cached = score_questions(loaded.model, questions, max_length=256, groups=[[0, 1]])
    assert cached == [pytest.approx(row, abs=1e-4) for row in plain]


def test_batched_equals_unbatched(loaded):
    prompts = pubmedqa_frame()["prompt"].tolist() + mmlu_frame(1)["prompt"].tolist()
    choices = [[" yes", " no", " maybe plugh"]] * len(prompts)
    questions = encode_questions(loaded.tokenizer, prompts, choices)
    assert len({len(q.context) for q in questions}) > 3, "lengths must differ for padding to matter"
    one = score_questions(loaded.model, questions, max_length=256, batch_size=1)
    many = score_questions(loaded.model, questions, max_length=256, batch_size=16)
    assert many == [pytest.approx(row, abs=1e-4) for row in one]


def test_every_question_reported_done_once(loaded):
    prompts = pubmedqa_frame()["prompt"].tolist()
    questions = encode_questions(loaded.tokenizer, prompts, [[" yes", " no plugh"]] * len(prompts))
    done = []
    scores = score_questions(loaded.model, questions, max_length=256, batch_size=4,
                             on_question_done=lambda q, row: done.append((q, list(row))))
    assert sorted(q for q, _ in done) == list(range(len(prompts)))
    assert all(row == scores[q] for q, row in done)  # each question's whole row, as returned


@pytest.mark.parametrize("in_flight", [0, 1, 2])
def test_a_forwards_scores_are_read_once_the_next_is_queued(loaded, monkeypatch, in_flight):
    # Reading scores waits for the GPU: with IN_FLIGHT = 1 the host queues forward n + 1 before it
    # reads forward n, on packs (grouped MMLU questions) and padded batches (ungrouped PubMedQA).
    from expert.evaluation import forwards, scoring

    events, real_read = [], forwards.Scored.read
    for name in ("forward_packed", "forward_padded"):
        def launch(*args, _real=getattr(forwards, name), **kwargs):
            out = _real(*args, **kwargs)
            out.number = sum(kind == "queued" for kind, _ in events)
            events.append(("queued", out.number))
            return out
        monkeypatch.setattr(forwards, name, launch)
    monkeypatch.setattr(forwards.Scored, "read", lambda self: events.append(("read", self.number)) or real_read(self))
    monkeypatch.setattr(scoring, "IN_FLIGHT", in_flight)
    monkeypatch.setattr(scoring, "pack_tokens", lambda model: 80)
    frame = mmlu_frame(4)
    prompts = frame["prompt"].tolist() + pubmedqa_frame()["prompt"].tolist()
    questions = encode_questions(loaded.tokenizer, prompts, [LETTERS] * len(prompts))
    groups = list(frame.groupby("subject", sort=False).indices.values())
    done = []
    scores = score_questions(loaded.model, questions, max_length=256, batch_size=3, groups=groups,
                             on_question_done=lambda q, row: done.append(q))
    total = sum(kind == "queued" for kind, _ in events)
    assert total > 6 and sorted(done) == list(range(len(prompts)))
    assert [n for kind, n in events if kind == "read"] == list(range(total))
    for at, (kind, n) in enumerate(events):
        if kind == "read":
            assert sum(k == "queued" for k, _ in events[:at]) == min(n + 1 + in_flight, total), events
    monkeypatch.setattr(scoring, "IN_FLIGHT", 1)
    assert score_questions(loaded.model, questions, max_length=256, batch_size=3, groups=groups) == scores


def test_model_max_length_reads_the_config(loaded):
    assert model_max_length(loaded.model, loaded.tokenizer) == loaded.model.config.max_position_embeddings
