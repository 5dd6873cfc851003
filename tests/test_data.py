"""The data layer: digits VQA task, LLaVA loader, task tokenizer, prompt template."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import runpy
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moiie.config_base import ConfigError
from moiie.data import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    QUESTION_TYPES,
    SPECIAL_TOKENS,
    TEMPLATE,
    DigitsVQAConfig,
    LlavaDataError,
    build_digits_vqa,
    digits_tokenizer,
    export_llava,
    image_token_id,
    load_llava,
    load_tokenizer,
    render,
    render_prompt,
    train_task_tokenizer,
)
from moiie.data.digits import all_question_answers, from_uint8
from moiie.data.template import conversation_text

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llava_digits"
YES_NO_TYPES = ("parity", "greater", "equals")
ALL_TYPES = DigitsVQAConfig(
    question_types=list(QUESTION_TYPES), samples_per_image_train=5, samples_per_image_eval=5
)


@pytest.fixture(scope="module")
def task():
    return build_digits_vqa(ALL_TYPES)


@pytest.fixture(scope="module")
def tokenizer():
    return digits_tokenizer()


def _key(samples):
    return [(s.id, s.question, s.answer, s.qtype, s.image_index) for s in samples]


@functools.cache
def _sklearn_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target


def _truth(sample) -> str:
    """The answer recomputed from scikit-learn's label and the number in the question."""
    digit = int(_sklearn_labels()[sample.image_index])
    numbers = [int(n) for n in re.findall(r"\d+", sample.question)]
    n = numbers[0] if numbers else None
    yes_no = {True: "yes", False: "no"}
    return {
        "digit": lambda: str(digit),
        "parity": lambda: yes_no[(digit % 2 == 0) == ("even" in sample.question)],
        "plus": lambda: str(digit + n),
        "greater": lambda: yes_no[digit > n],
        "equals": lambda: yes_no[digit == n],
    }[sample.qtype]()


# --- digits task -----------------------------------------------------------------------------


def test_split_is_by_image_with_fixed_sizes():
    train, held_out = build_digits_vqa(DigitsVQAConfig())
    train_images = {s.image_index for s in train}
    eval_images = {s.image_index for s in held_out}
    assert (len(train_images), len(eval_images)) == (1437, 360)
    assert not train_images & eval_images
    assert train_images | eval_images == set(range(1797))


def test_builds_are_deterministic_and_seeds_do_what_they_say(task):
    again = build_digits_vqa(ALL_TYPES)
    for first, second in zip(task, again):
        assert _key(first) == _key(second)
        assert all(np.array_equal(a.image, b.image) for a, b in zip(first, second))
    reseeded = build_digits_vqa(ALL_TYPES.model_copy(update={"seed": 1}))
    assert {s.image_index for s in reseeded[1]} == {s.image_index for s in task[1]}
    assert _key(reseeded[1]) != _key(task[1])
    resplit = build_digits_vqa(ALL_TYPES.model_copy(update={"split_seed": 1}))
    assert {s.image_index for s in resplit[1]} != {s.image_index for s in task[1]}


def test_samples_are_well_formed(task):
    from sklearn.datasets import load_digits

    raw = load_digits()
    for samples in task:
        assert len({s.id for s in samples}) == len(samples)
        for s in samples[:: len(QUESTION_TYPES) * 7]:
            assert s.image.dtype == np.float32 and s.image.shape == (8, 8)
            assert np.array_equal(s.image, raw.images[s.image_index])
            assert s.label == raw.target[s.image_index]
        assert all(s.question.count(IMAGE_TOKEN) == 1 and s.question.startswith(IMAGE_TOKEN) for s in samples)
        assert all(len(s.answer.split()) == 1 for s in samples)
        assert {(s.question, s.answer) for s in samples} <= set(all_question_answers())


@pytest.mark.parametrize("per_image", [1, 2, 5, 7])
def test_question_types_are_balanced(per_image):
    config = ALL_TYPES.model_copy(
        update={"samples_per_image_train": per_image, "samples_per_image_eval": per_image}
    )
    for samples in build_digits_vqa(config):
        counts = Counter(s.qtype for s in samples)
        assert set(counts) == set(QUESTION_TYPES)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_answers_are_correct(task):
    for samples in task:
        wrong = [s for s in samples if s.answer != _truth(s)]
        assert not wrong, wrong[:3]


def test_yes_no_answers_are_balanced(task):
    train, _ = task
    for qtype in YES_NO_TYPES:
        answers = Counter(s.answer for s in train if s.qtype == qtype)
        assert set(answers) == {"yes", "no"}
        assert 0.4 < answers["yes"] / answers.total() < 0.6, (qtype, answers)


@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_answer_needs_both_image_and_question(task, qtype):
    train, _ = task
    samples = [s for s in train if s.qtype == qtype]
    by_text: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        by_text[s.question][s.answer] += 1
    # the question text alone does not determine the answer...
    assert all(len(answers) >= 2 for answers in by_text.values() if answers.total() >= 20)
    text_only_accuracy = sum(max(a.values()) for a in by_text.values()) / len(samples)
    assert text_only_accuracy < 0.8
    # ...and, past "which digit", neither does the image alone
    if qtype != "digit":
        by_digit: dict[int, set] = defaultdict(set)
        for s in samples:
            by_digit[s.label].add(s.answer)
        assert sum(len(a) >= 2 for a in by_digit.values()) >= 8


def test_config_validates_and_round_trips():
    assert DigitsVQAConfig.from_json(ALL_TYPES.to_json()) == ALL_TYPES
    assert DigitsVQAConfig.from_yaml(ALL_TYPES.to_yaml()) == ALL_TYPES
    with pytest.raises(ConfigError, match="question_types"):
        DigitsVQAConfig.parse({"question_types": ["digit", "colour"]})
    with pytest.raises(ConfigError, match="question_types"):
        DigitsVQAConfig.parse({"question_types": ["digit", "digit"]})
    with pytest.raises(ConfigError, match="unknown field"):
        DigitsVQAConfig.parse({"seeds": 3})


# --- LLaVA loader --------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["data.jsonl", "data.json"])
def test_export_then_load_round_trips(task, tmp_path, filename):
    samples = task[1][:23]
    path = export_llava(samples, tmp_path, filename=filename)
    loaded = load_llava(path)
    assert [s.id for s in loaded] == [s.id for s in samples]
    for original, back in zip(samples, loaded):
        assert back.conversations == original.conversations
        assert back.meta == {"qtype": original.qtype}
        (image,) = back.images
        assert image.mode == "L" and image.size == (8, 8)
        assert np.array_equal(from_uint8(image), original.image)


def test_shipped_example_loads_and_regenerates_identically(tmp_path):
    samples = load_llava(EXAMPLE / "data.jsonl", eager=True)
    assert len(samples) == 20
    assert {s.meta["qtype"] for s in samples} == set(QUESTION_TYPES)
    made = runpy.run_path(str(EXAMPLE / "make.py"))["make"](tmp_path)
    assert made.read_text() == (EXAMPLE / "data.jsonl").read_text()
    shipped = sorted(p.name for p in (EXAMPLE / "images").iterdir())
    assert shipped == sorted(p.name for p in (tmp_path / "images").iterdir())
    for name in shipped:
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "images" / name)),
            np.asarray(Image.open(EXAMPLE / "images" / name)),
        )


def _record(image="a.png", conversations=None, **extra):
    if conversations is None:
        conversations = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "This."}]
    return {"id": "x", "image": image, "conversations": conversations, **extra}


BAD_RECORDS = {
    "missing image": (_record(image="nowhere.png"), "image file not found: 'nowhere.png'"),
    "no conversations": ({"id": "x", "image": "a.png"}, "expected 'conversations'"),
    "wrong role": (
        _record(conversations=[{"from": "human", "value": "<image>\nQ"}, {"from": "human", "value": "A"}]),
        "turn 1: expected from='gpt'",
    ),
    "unanswered": (_record(conversations=[{"from": "human", "value": "<image>\nQ"}]), "needs a 'gpt' answer"),
    "too many placeholders": (
        _record(
            conversations=[{"from": "human", "value": "<image><image>\nQ"}, {"from": "gpt", "value": "A"}]
        ),
        "2 <image> placeholder(s) but 'image' lists 1 image(s)",
    ),
    "placeholder without image": (_record(image=None), "1 <image> placeholder(s) but 'image' lists 0"),
    "not an object": (["a.png"], "expected an object"),
}


def _write_png(path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_jsonl_errors_name_file_line_and_problem(tmp_path, case):
    record, expected = BAD_RECORDS[case]
    _write_png(tmp_path / "a.png")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(_record()) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(LlavaDataError) as err:
        load_llava(path)
    assert f"{path}, line 3: " in str(err.value) and expected in str(err.value)
    assert err.value.line == 3


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_json_errors_name_file_record_and_problem(tmp_path, case):
    record, expected = BAD_RECORDS[case]
    _write_png(tmp_path / "a.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_record(), _record(), record]))
    with pytest.raises(LlavaDataError) as err:
        load_llava(path)
    assert f"{path}, record 2 (0-based): " in str(err.value) and expected in str(err.value)


def test_unparsable_files_name_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps(
            _record(
                image=None, conversations=[{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
            )
        )
        + "\n{oops\n"
    )
    with pytest.raises(LlavaDataError, match=r"data.jsonl, line 2: not valid JSON"):
        load_llava(path)
    path = tmp_path / "data.json"
    path.write_text('[\n{"id": 1},\n{oops}\n]')
    with pytest.raises(LlavaDataError, match=r"data.json, line 3: not valid JSON"):
        load_llava(path)
    path.write_text('{"id": 1}')
    with pytest.raises(LlavaDataError, match="expected a JSON list"):
        load_llava(path)
    path.write_text("[]")
    with pytest.raises(LlavaDataError, match="no records"):
        load_llava(path)


def test_unreadable_image_fails_lazily_or_eagerly_naming_the_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(_record()) + "\n")
    (sample,) = load_llava(path)
    with pytest.raises(LlavaDataError, match=r"data.jsonl, line 1: cannot read image"):
        sample.images  # noqa: B018
    with pytest.raises(LlavaDataError, match=r"data.jsonl, line 1: cannot read image"):
        load_llava(path, eager=True)


def test_several_images_text_only_records_and_image_folder(tmp_path):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    _write_png(pictures / "a.png")
    _write_png(pictures / "b.png")
    two = _record(
        image=["a.png", str(pictures / "b.png")],
        conversations=[
            {"from": "human", "value": "<image>\nand <image>: same?"},
            {"from": "gpt", "value": "yes"},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "yes"},
        ],
    )
    # a raw line separator inside a string must not split the record
    text_only = {
        "conversations": [{"from": "human", "value": "Hi\u2028there"}, {"from": "gpt", "value": "Hello"}]
    }
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(two) + "\n" + json.dumps(text_only, ensure_ascii=False) + "\n")
    with pytest.raises(LlavaDataError, match="line 1: image file not found: 'a.png'"):
        load_llava(path)
    first, second = load_llava(path, image_folder=pictures)
    assert first.image_paths == [pictures / "a.png", pictures / "b.png"] and len(first.images) == 2
    assert second.images == [] and second.id == "data.jsonl:2"
    assert second.conversations[0]["value"] == "Hi\u2028there"


# --- tokenizer -----------------------------------------------------------------------------------


def _fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def test_tokenizer_special_tokens_and_image_is_one_token(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False) == [image_token_id(tokenizer)]
    ids = tokenizer.encode("<image>\n<image>What", add_special_tokens=False)
    assert ids.count(image_token_id(tokenizer)) == 2
    assert (
        tokenizer.pad_token,
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.unk_token,
    ) == SPECIAL_TOKENS[:4]


def test_tokenizer_round_trips_text(tokenizer):
    texts = [
        conversation_text([{"from": "human", "value": q}, {"from": "gpt", "value": a}])
        for q, a in all_question_answers()
    ]
    texts += ["Ünïcode, tabs\tand  spaces <image> 12345 ✓", ""]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # every answer of the task is one token after the template's space
    assert all(
        len(tokenizer.encode(" " + a, add_special_tokens=False)) == 1 for _, a in all_question_answers()
    )


def test_tokenizer_is_deterministic(tokenizer):
    # each training builds its hash maps with fresh random seeds, so this also covers other processes
    texts = ["the cat sat on the mat", "the dog sat", "<image>\nwhat sat?"] * 3
    first, second = train_task_tokenizer(texts, vocab_size=300), train_task_tokenizer(texts, vocab_size=300)
    assert first.get_vocab() == second.get_vocab() and _fingerprint(first) == _fingerprint(second)
    assert _fingerprint(digits_tokenizer()) == _fingerprint(tokenizer)


def test_tokenizer_saves_and_loads_offline(tokenizer, tmp_path):
    cached = digits_tokenizer(cache_dir=tmp_path)
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert digits_tokenizer(cache_dir=tmp_path).get_vocab() == tokenizer.get_vocab()
    text = "<image>\nIs this digit greater than 4?"
    for other in (cached, load_tokenizer(folder)):
        assert other.encode(text, add_special_tokens=False) == tokenizer.encode(
            text, add_special_tokens=False
        )
        assert image_token_id(other) == image_token_id(tokenizer)
        assert other.eos_token_id == tokenizer.eos_token_id


def test_train_task_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_task_tokenizer(["a b"], vocab_size=100)


# --- template ------------------------------------------------------------------------------------


def _gpt2_style_tokenizer():
    """A byte-level BPE tokenizer with GPT-2's conventions: one <|endoftext|> for bos and eos, no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["What is this digit plus 3? user assistant yes no"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def _check_masking(conversations, tokenizer):
    ids, labels = render(conversations, tokenizer)
    assert len(ids) == len(labels)
    kept = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in kept)
    # the kept positions are exactly each answer followed by eos
    answers = [t["value"] for t in conversations if t["from"] == "gpt"]
    expected = []
    for answer in answers:
        expected += [*tokenizer.encode(" " + answer, add_special_tokens=False), tokenizer.eos_token_id]
    assert [ids[i] for i in kept] == expected
    assert ids.count(image_token_id(tokenizer)) == sum(t["value"].count(IMAGE_TOKEN) for t in conversations)
    # generation starts right where the last answer starts
    prompt = render_prompt(conversations[:-1], tokenizer)
    assert ids[: len(prompt)] == prompt
    last_answer = [*tokenizer.encode(" " + answers[-1], add_special_tokens=False), tokenizer.eos_token_id]
    assert ids[len(prompt) :] == last_answer
    return ids, labels


def test_template_masks_everything_but_answers(task, tokenizer):
    for sample in task[1][:10]:
        ids, _ = _check_masking(sample.conversations, tokenizer)
        assert tokenizer.decode(ids) == TEMPLATE.format(question=sample.question, answer=sample.answer)


def test_template_multi_turn(tokenizer):
    conversations = [
        {"from": "human", "value": "<image>\nWhat digit is this?"},
        {"from": "gpt", "value": "7"},
        {"from": "human", "value": "Is this digit odd?"},
        {"from": "gpt", "value": "yes"},
    ]
    ids, _ = _check_masking(conversations, tokenizer)
    assert (
        tokenizer.decode(ids)
        == "<bos>user: <image>\nWhat digit is this?\nassistant: 7<eos>user: Is this digit odd?\nassistant: yes<eos>"
    )


def test_template_works_with_a_generic_tokenizer():
    tokenizer = _gpt2_style_tokenizer()
    conversations = [
        {"from": "human", "value": "<image>\nWhat is this digit plus 3?"},
        {"from": "gpt", "value": "10"},
    ]
    with pytest.raises(ValueError, match="<image>"):
        render(conversations, tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    ids, _ = _check_masking(conversations, tokenizer)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("conversations", "message"),
    [
        ([], "non-empty list"),
        ([{"from": "gpt", "value": "A"}], "turn 0: expected from='human'"),
        ([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<image>"}], "human' turns only"),
    ],
)
def test_template_rejects_malformed_conversations(tokenizer, conversations, message):
    with pytest.raises(ValueError, match=message):
        render(conversations, tokenizer)
    with pytest.raises(ValueError, match="must end with a 'human' turn"):
        render_prompt([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], tokenizer)
