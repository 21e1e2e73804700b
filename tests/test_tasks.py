"""layerwise.tasks: the task loader (files, modules, errors), the example user task,
the BERT-style ``mlm`` task and the splits of every built-in task."""
from __future__ import annotations

import math
import multiprocessing as mp
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from layerwise.tasks import Task, TaskData, UnknownTaskError, get_task, task_names, validate_task
from layerwise.tasks.charlm import ByteTransformer, corpus_bytes
from layerwise.tasks.mlm import IGNORE, MASK_ID, MLM, mask_tokens

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "user_task.py"

# A minimal valid task; {extra} is spliced into the class body.
TASK_FILE = '''
import torch
from torch.nn import functional as F
from layerwise.tasks import Task, TaskData

class Tiny(Task):
    name = "tiny"
    metric = "accuracy"
    ablate_batch_sizes = (2, 4)
    default_batch_size = 4
    base_batch_size = 2
    base_lr = {{"lamb": 0.01}}
{extra}
    def load_data(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(20, 3, generator=g)
        y = (x[:, 0] > 0).long()
        return TaskData(x[:12], y[:12], x[12:16], y[12:16], x[16:], y[16:])

    def build_model(self):
        return torch.nn.Linear(3, 2)

    def loss(self, model, x, y):
        return F.cross_entropy(model(x), y)

    def evaluate(self, model, x, y):
        logits = model(x)
        return {{"loss": F.cross_entropy(logits, y).item(),
                 "accuracy": (logits.argmax(1) == y).float().mean().item()}}

def make_task():
    return Tiny()

def other():
    t = Tiny()
    t.name = "tiny_other"
    return t
'''


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def task_file(tmp_path):
    return write(tmp_path / "my_task.py", TASK_FILE.format(extra=""))


def error(ref: str) -> str:
    with pytest.raises(UnknownTaskError) as info:
        get_task(ref)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# ---------------------------------------------------------------- loading
def test_builtins_in_order_with_ref():
    assert task_names() == ["digits", "charlm", "mlm"]
    for name in task_names():
        task = get_task(name)
        assert task.name == name and task.ref == name


def test_file_default_and_named_function(task_file):
    task = get_task(str(task_file))
    assert isinstance(task, Task) and task.name == "tiny"
    assert task.ref == f"{task_file.resolve()}:make_task"
    other = get_task(f"{task_file}:other")
    assert other.name == "tiny_other" and other.ref == f"{task_file.resolve()}:other"
    assert type(other).__name__ == "Tiny"


def test_relative_path_gives_absolute_ref(task_file, monkeypatch):
    monkeypatch.chdir(task_file.parent)
    task = get_task("my_task.py")
    assert task.ref == f"{task_file.resolve()}:make_task"
    assert Path(task.ref.rsplit(":", 1)[0]).is_absolute()


def test_fresh_instance_per_call(task_file):
    a, b = get_task(str(task_file)), get_task(str(task_file))
    assert a is not b and a.name == b.name
    assert a.data() is not b.data()
    assert torch.equal(a.data().x_train, b.data().x_train)
    assert get_task("digits") is not get_task("digits")


def test_module_function(tmp_path, monkeypatch):
    pkg = tmp_path / "mytasks_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(pkg / "tasks.py", TASK_FILE.format(extra=""))
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task("mytasks_pkg.tasks:make_task")
    assert task.name == "tiny" and task.ref == "mytasks_pkg.tasks:make_task"
    assert get_task("mytasks_pkg.tasks:other").name == "tiny_other"
    assert "no module named 'nope_pkg'" in error("nope_pkg.tasks:make_task")
    assert "no function 'missing'" in error("mytasks_pkg.tasks:missing")


def test_file_is_imported_by_path_not_sys_path(task_file):
    assert str(task_file.parent) not in sys.path
    get_task(str(task_file))
    assert "my_task" not in sys.modules


def _spawned_ref(ref: str) -> tuple[str, str, list[float]]:
    from layerwise.tasks import get_task as load
    task = load(ref)
    return task.name, task.ref, task.data().x_val.flatten().tolist()


def test_ref_round_trip_in_a_spawned_process(task_file, monkeypatch):
    task = get_task(str(task_file))
    monkeypatch.chdir("/")                       # the ref must not depend on the cwd
    with mp.get_context("spawn").Pool(1) as pool:
        name, ref, x_val = pool.apply(_spawned_ref, (task.ref,))
    assert (name, ref) == (task.name, task.ref)
    assert x_val == task.data().x_val.flatten().tolist()


# ---------------------------------------------------------------- loader errors
def test_unknown_name_lists_builtins():
    message = error("mnist")
    assert message.startswith("unknown task 'mnist'; known tasks: digits, charlm, mlm")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.py"
    assert error(str(missing)) == f"--task {missing}: no such file '{missing}'"
    assert "is a directory" in error(str(tmp_path) + "/")


def test_syntax_error(tmp_path):
    bad = write(tmp_path / "broken.py", "import torch\n\ndef make_task(:\n    pass\n")
    message = error(str(bad))
    assert message.startswith(f"{bad}:3: SyntaxError: "), message


def test_import_raises(tmp_path):
    bad = write(tmp_path / "raises.py", "x = 1\nraise RuntimeError('no data here')\n")
    message = error(str(bad))
    assert message == (f"--task {bad}: importing it raised RuntimeError: no data here "
                       f"({bad}:2)")
    dep = write(tmp_path / "dep.py", "import no_such_dependency_xyz\n")
    assert error(str(dep)).startswith(
        f"--task {dep}: importing it raised ModuleNotFoundError: No module named "
        "'no_such_dependency_xyz'")


def test_missing_function(tmp_path, task_file):
    empty = write(tmp_path / "empty.py", "X = 1\n")
    assert error(str(empty)) == (f"--task {empty}: no function 'make_task' (define "
                                 "make_task() returning a layerwise.tasks.Task)")
    assert error(f"{task_file}:nothing_here") == (
        f"--task {task_file}:nothing_here: no function 'nothing_here' (define "
        "nothing_here() returning a layerwise.tasks.Task)")
    assert "'X' is a int, not a function" in error(f"{empty}:X")


def test_function_returning_a_non_task(tmp_path):
    f = write(tmp_path / "non_task.py", "def make_task():\n    return {'name': 'x'}\n")
    assert error(str(f)) == (f"--task {f}: make_task() returned a dict, not an instance of "
                             "a layerwise.tasks.Task subclass")
    g = write(tmp_path / "none_task.py", "def make_task():\n    pass\n")
    assert "make_task() returned None" in error(str(g))
    h = write(tmp_path / "raising_task.py", "def make_task():\n    return 1 / 0\n")
    assert error(str(h)) == f"--task {h}: make_task() raised ZeroDivisionError: division by zero"
    cls = write(tmp_path / "cls_task.py", TASK_FILE.format(extra="") + "\nmake = Tiny\n")
    assert "is a Task class" in error(f"{cls}:make")


@pytest.mark.parametrize("extra, expected", [
    ('    name = ""', "Tiny.name must be a non-empty string"),
    ('    name = "my task"', "Tiny.name 'my task' must not contain whitespace or path"),
    ('    name = "a/b"', "Tiny.name 'a/b' must not contain whitespace or path"),
    ('    name = "digits"', "the task's name 'digits' is a built-in task's name"),
    ('    metric = ""', "Tiny.metric must be a non-empty string"),
    ('    metric = "f1"', "evaluate() on the val split has no 'f1' (keys: loss, accuracy)"),
    ("    higher_is_better = 1", "Tiny.higher_is_better must be True or False, not 1"),
    ("    target = float('nan')", "Tiny.target must be None or a finite number, not nan"),
    ("    target = '0.9'", "Tiny.target must be None or a finite number, not '0.9'"),
    ('    base_lr = {"lamb": 0}', "Tiny.base_lr['lamb'] = 0: must be a positive finite"),
    ('    base_lr = {"lamb": float("inf")}', "Tiny.base_lr['lamb'] = inf: must be a positive"),
    ('    base_lr = {1: 0.1}', "Tiny.base_lr[1] = 0.1: must be a positive finite number"),
    ("    ablate_batch_sizes = (2, 13)", "ablate_batch_sizes: 13 must be a positive int no "
                                        "larger than the training set (12 examples)"),
    ("    ablate_batch_sizes = (0,)", "ablate_batch_sizes: 0 must be a positive int"),
    ("    ablate_batch_sizes = (2.0,)", "ablate_batch_sizes: 2.0 must be a positive int"),
    ("    ablate_batch_sizes = ()", "ablate_batch_sizes must be a non-empty tuple"),
    ("    default_batch_size = 50", "Tiny.default_batch_size = 50: must be a positive int"),
    ("    ablate_epochs = 0", "Tiny.ablate_epochs = 0: must be a positive int"),
    ("    relative_cost = -1", "Tiny.relative_cost = -1: must be a positive finite number"),
    ('    base_hypers = {"sgd": {"momentum": "high"}}',
     "Tiny.base_hypers['sgd']['momentum'] = 'high': must be a finite number"),
    ("    def __init__(self):\n        self.x = 1\n", "Tiny.__init__ must call super().__init__()"),
])
def test_invalid_attributes(tmp_path, extra, expected):
    f = write(tmp_path / "bad_attr.py", TASK_FILE.format(extra=extra))
    message = error(str(f))
    assert message.startswith(f"--task {f}: ") and expected in message, message


BAD_DATA = {
    "not TaskData": ("        return (1, 2)\n",
                     "load_data() returned a tuple, not a layerwise.tasks.TaskData"),
    "mismatched rows": ("        x = torch.zeros(20, 3); y = torch.zeros(20).long()\n"
                        "        return TaskData(x[:12], y[:11], x[12:16], y[12:16], x[16:], "
                        "y[16:])\n",
                        "load_data(): x_train has 12 examples but y_train has 11"),
    "empty test": ("        x = torch.zeros(20, 3); y = torch.zeros(20).long()\n"
                   "        return TaskData(x[:12], y[:12], x[12:20], y[12:20], x[20:], y[20:])\n",
                   "load_data(): the test split is empty"),
    "not a tensor": ("        x = torch.zeros(20, 3); y = torch.zeros(20).long()\n"
                     "        return TaskData(x[:12], y[:12].tolist(), x[12:16], y[12:16], "
                     "x[16:], y[16:])\n",
                     "load_data(): y_train is a list, not a torch.Tensor"),
    "raises": ("        raise FileNotFoundError('data.csv')\n",
               "load_data() raised FileNotFoundError: data.csv"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_task_data(tmp_path, case):
    body, expected = BAD_DATA[case]
    text = TASK_FILE.format(extra="").replace(
        "    def load_data(self):\n", "    def load_data(self):\n" + body + "\n    def _old(self):\n")
    f = write(tmp_path / "bad_data.py", text)
    message = error(str(f))
    assert message == f"--task {f}: {expected}", message


def test_bad_model_and_evaluate(tmp_path):
    text = TASK_FILE.format(extra="")
    no_module = write(tmp_path / "bad_model.py", text.replace(
        "return torch.nn.Linear(3, 2)", "return 'a model'"))
    assert error(str(no_module)) == (f"--task {no_module}: build_model() returned a str, not "
                                     "a torch.nn.Module")
    wrong_shape = write(tmp_path / "bad_eval.py", text.replace(
        "torch.nn.Linear(3, 2)", "torch.nn.Linear(4, 2)"))
    message = error(str(wrong_shape))
    assert message.startswith(f"--task {wrong_shape}: evaluate() on the val split raised "
                              "RuntimeError: "), message
    not_dict = write(tmp_path / "eval_list.py", text.replace(
        'return {"loss": F.cross_entropy', 'return [F.cross_entropy').replace(
        '.float().mean().item()}', '.float().mean().item()]').replace(
        '"accuracy": (logits', '(logits'))
    assert "evaluate() returned a list, not a dict" in error(str(not_dict))


def test_changed_file_is_imported_again(task_file):
    assert get_task(str(task_file)).metric_percent is False
    text = task_file.read_text().replace('metric = "accuracy"',
                                         'metric = "accuracy"\n    metric_percent = True')
    task_file.write_text(text)
    assert get_task(str(task_file)).metric_percent is True


def test_validation_keeps_the_global_rng(task_file):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get_task(str(task_file))
    assert torch.equal(torch.rand(3), expected)


def test_builtins_are_valid():
    for name in task_names():
        task = get_task(name)
        assert validate_task(task) is task
    with pytest.raises(UnknownTaskError, match="^--task x: an? .*not an instance of a "):
        validate_task(object(), "x")


# ---------------------------------------------------------------- the example user task
def test_example_user_task_trains():
    from layerwise.train import train

    task = get_task(str(EXAMPLE))
    assert task.name == "cancer" and task.ref == f"{EXAMPLE}:make_task"
    data = task.data()
    assert (data.n_train, data.n_val, data.n_test) == (398, 85, 86)
    assert data.x_train.dtype == torch.float32 and data.x_train.shape[1] == 30
    # stratified: each split has the data set's 62.7% benign share, within 1 example
    for y in (data.y_train, data.y_val, data.y_test):
        assert abs(y.float().mean().item() - 357 / 569) < 1.0 / len(y)
    # standardised with the training split's statistics
    assert data.x_train.mean(0).abs().max() < 1e-5
    record = train(task, "lamb", max_steps=5, progress=False)
    assert record["steps"] == 5 and len(record["loss"]) == 5
    assert all(math.isfinite(x) for x in record["loss"])
    assert math.isfinite(record["final"]["loss"]) and 0.0 <= record["final"]["value"] <= 1.0


# ---------------------------------------------------------------- mlm
@pytest.fixture(scope="module")
def mlm():
    return get_task("mlm")


def test_mlm_split_sizes_and_shapes(mlm):
    data = mlm.data()
    assert (data.n_train, data.n_val, data.n_test) == (3278, 182, 182)
    for split in ("train", "val", "test"):
        x, y = data.split(split)
        assert x.shape == y.shape == (len(x), 32)
        assert x.dtype == y.dtype == torch.int64
        assert int(x.min()) >= 0 and int(x.max()) <= MASK_ID
        assert set(y.unique().tolist()) <= {IGNORE, *range(256)}


def _check_masking(inputs, labels, original, per_row=5):
    """Counts ``(chosen, [MASK], unchanged, other byte)`` after checking the invariants."""
    chosen = labels != IGNORE
    # labels: the original byte where chosen, -100 exactly elsewhere
    assert torch.equal(labels[chosen], original[chosen])
    assert torch.equal(inputs[~chosen], original[~chosen])
    # exactly round(0.15 * T) chosen per window (5 of 32)
    assert (chosen.sum(1) == per_row).all()
    n = int(chosen.sum())
    masked = int((inputs[chosen] == MASK_ID).sum())
    kept = int((inputs[chosen] == original[chosen]).sum())
    return n, masked, kept, n - masked - kept


def test_mlm_masking_proportions(mlm):
    data = mlm.data()
    ids = mlm.train_ids()
    n, masked, kept, replaced = _check_masking(data.x_train, data.y_train, ids)
    assert abs(n / ids.numel() - 0.15) < 0.01                   # 5/32 = 15.6%
    # 80% [MASK], 10% random byte, 10% unchanged (a random byte equals the
    # original 1/256 of the time, so "kept" is 10% + 10%/256)
    assert abs(masked / n - 0.8) < 0.01
    assert abs(kept / n - (0.1 + 0.1 / 256)) < 0.008
    assert abs(replaced / n - (0.1 - 0.1 / 256)) < 0.008


def test_mlm_training_masks_dynamic_and_reproducible(mlm):
    ids = mlm.train_ids()
    a = list(mlm.batches(64, 0, 0))
    b = list(mlm.batches(64, 0, 0))
    c = list(mlm.batches(64, 1, 0))
    d = list(mlm.batches(64, 0, 1))
    assert len(a) == mlm.steps_per_epoch(64) == 3278 // 64
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))
    assert not torch.equal(a[0][1], d[0][1])
    # every batch is a correct masking of original windows, fresh per epoch
    original = {tuple(row) for row in ids.tolist()}
    total = masked = 0
    for x, y in a + c:
        rows = torch.where(y == IGNORE, x, y)
        assert all(tuple(r) in original for r in rows.tolist())
        n, m, _, _ = _check_masking(x, y, rows)
        total, masked = total + n, masked + m
    assert abs(masked / total - 0.8) < 0.02
    # the same window is masked differently in epochs 0 and 1
    first = {tuple(r): y_row for x, y in a for r, y_row in
             zip(torch.where(y == IGNORE, x, y).tolist(), (y != IGNORE).tolist())}
    second = {tuple(r): y_row for x, y in c for r, y_row in
              zip(torch.where(y == IGNORE, x, y).tolist(), (y != IGNORE).tolist())}
    common = set(first) & set(second)
    assert len(common) > 1000
    assert sum(first[k] != second[k] for k in common) > 0.9 * len(common)


def test_mlm_eval_masks_fixed(mlm):
    again = MLM().data()
    data = mlm.data()
    for split in ("train", "val", "test"):
        assert torch.equal(data.split(split)[0], again.split(split)[0])
        assert torch.equal(data.split(split)[1], again.split(split)[1])
    assert not torch.equal(data.y_val[:100], data.y_test[:100])


def test_mask_tokens_function():
    ids = torch.randint(0, 256, (4000, 40), generator=torch.Generator().manual_seed(3))
    x1, y1 = mask_tokens(ids, torch.Generator().manual_seed(5))
    x2, y2 = mask_tokens(ids, torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    n, masked, kept, replaced = _check_masking(x1, y1, ids, per_row=6)
    assert n == 6 * 4000
    assert abs(masked / n - 0.8) < 0.01 and abs(replaced / n - 0.1) < 0.01
    with pytest.raises(ValueError, match="expects \\(N, T\\)"):
        mask_tokens(ids[0], torch.Generator())


def test_mlm_model_and_metric(mlm):
    torch.manual_seed(0)
    model = mlm.build_model()
    x, y = mlm.data().x_val[:5], mlm.data().y_val[:5]
    logits = model(x)
    assert logits.shape == (5, 32, 256) and logits.dtype == torch.float32
    keep = y != IGNORE
    assert torch.allclose(model(x, keep), logits[keep], atol=1e-6)
    # bidirectional: changing the last byte changes the logits at the first position
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 256
    assert not torch.allclose(model(x2)[:, 0], logits[:, 0])
    assert sum(p.numel() for p in model.parameters()) == 43168
    assert len(list(model.parameters())) == 30
    for split in ("val", "test"):
        ev = mlm.evaluate_split(model, split)
        assert set(ev) == {"loss", "masked_accuracy"}
        assert ev["loss"] == pytest.approx(math.log(256), abs=0.6)   # untrained: ~uniform
        assert 0.0 <= ev["masked_accuracy"] < 0.05
    # the loss is the cross-entropy over masked positions only
    x, y = next(mlm.batches(16, 0, 0))
    full = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(),
                                             ignore_index=IGNORE)
    assert mlm.loss(model, x, y).item() == pytest.approx(full.item(), rel=1e-5)


def test_mlm_short_training_lowers_masked_loss(mlm):
    from layerwise.train import train

    torch.manual_seed(0)
    start = mlm.evaluate_split(mlm.build_model(), "val")
    record = train(mlm, "adamw", batch_size=32, max_steps=60, progress=False, threads=1)
    assert record["final"]["val_loss"] < start["loss"] - 1.5
    assert record["final"]["loss"] < start["loss"] - 1.5
    assert record["final"]["value"] > 0.15 and record["final"]["val_value"] > 0.15


def test_charlm_block_unchanged_by_causal_flag():
    torch.manual_seed(0)
    model = ByteTransformer()
    assert all(block.causal for block in model.blocks)
    assert sum(p.numel() for p in model.parameters()) == 84544
    # causal: changing the last byte leaves the logits of earlier positions alone
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 256
    assert torch.equal(model(x)[:, :-1], model(x2)[:, :-1])


# ---------------------------------------------------------------- disjoint splits
def test_digits_split_sizes_and_disjoint():
    data = get_task("digits").data()
    assert (data.n_train, data.n_val, data.n_test) == (1437, 180, 180)
    # the 1,797 images are all distinct, so disjoint splits share no image
    sets = [{tuple(r) for r in x.flatten(1).tolist()}
            for x in (data.x_train, data.x_val, data.x_test)]
    assert [len(s) for s in sets] == [1437, 180, 180]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def _ranges():
    raw = corpus_bytes()
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
    cut, cut2 = int(0.9 * len(data)), int(0.95 * len(data))
    return data, cut, cut2


def test_charlm_splits_are_contiguous_byte_ranges():
    data, cut, cut2 = _ranges()
    d = get_task("charlm").data()
    ctx = 64
    assert torch.equal(d.x_train.flatten(), data[: d.n_train * ctx])
    assert torch.equal(d.x_val.flatten(), data[cut: cut + d.n_val * ctx])
    assert torch.equal(d.x_test.flatten(), data[cut2: cut2 + d.n_test * ctx])
    assert d.n_train * ctx + 1 <= cut and cut + d.n_val * ctx + 1 <= cut2
    assert cut2 + d.n_test * ctx + 1 <= len(data)


def test_mlm_splits_are_from_disjoint_byte_ranges(mlm):
    data, cut, cut2 = _ranges()
    ctx = 32

    def windows(seq):
        n = len(seq) // ctx
        return seq[: n * ctx].view(n, ctx)

    d = mlm.data()
    assert torch.equal(mlm.train_ids(), windows(data[:cut])[::4])
    for split, lo, hi in (("val", cut, cut2), ("test", cut2, len(data))):
        x, y = d.split(split)
        original = torch.where(y == IGNORE, x, y)
        assert torch.equal(original, windows(data[lo:hi])[::4])
