"""``train.mixed_precision: auto`` and ``train.channels_last: auto``: measured, not guessed.

Whether bf16 autocast or the channels_last memory format speeds a training step up depends on the
machine (AMX or not, GPU or not) and on the model (feature-map sizes, how much elementwise quantizer
work there is), so no rule of thumb holds. ``choose_precision`` times a few real training steps of the
spec's own system (its method's objective, its optimizer, random inputs of its shape and per-process
batch) for each candidate and takes the fastest. The choice is cached per (machine, spec shape), so a
rerun, a resumed run or another spec with the same networks does not probe again; a run records what
it used in ``RUN_DIR/precision.json``, which ``--resume`` and ``cmtkd-graph eval`` reuse.

On CUDA, mixed precision ``auto`` is bf16 where the GPU supports it (fp32 otherwise) without probing:
tensor cores make bf16 the faster choice for convolutions there; channels_last is still timed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cmtkd_graph.runtime.layout import channels_last_module, channels_last_tensor
from cmtkd_graph.spec import Spec
from cmtkd_graph.tasks import task_record

log = logging.getLogger("cmtkd_graph")

RUN_FILE = "precision.json"
# A candidate must beat fp32/contiguous by this margin to be chosen: bf16 changes the numbers, and
# differences smaller than this are within the run-to-run noise of a short probe.
MARGIN = 0.05
PROBE_STEPS = 3  # timed rounds (one step of each candidate per round), after one warm-up step


@dataclass
class Precision:
    """What a run trains with, and why."""

    mixed_precision: str | None  # "no", "fp16", "bf16", or None (the accelerate config's choice)
    channels_last: bool
    source: str  # "spec", "probe", "cache" or "run" (a resumed run's own record)
    seconds_per_step: dict[str, float] = field(default_factory=dict)  # candidate label -> time

    @property
    def label(self) -> str:
        return _label(self.mixed_precision or "no", self.channels_last)

    def compile_options(self) -> dict[str, bool]:
        """Inductor options for ``train.compile`` that follow this memory-format choice.

        Inductor's layout optimization makes convolution activations channels_last inside the compiled
        graph: the compiled form of ``channels_last``. Where channels_last was not chosen (it did not pay
        here, or the spec says so), it only adds work: each weight gradient comes back channels_last and
        is copied into its parameter's layout (quickstart system on a 2-core Xeon without AMX: compiled
        step x1.25 with it, x1.43 without; ``python -m bench.step --only c``).
        """
        return {"layout_optimization": self.channels_last}

    def describe(self) -> str:
        """One line for the log: the choice and the measured ratios behind it."""
        mixed = self.mixed_precision or "from accelerate config"
        what = f"mixed precision {mixed}, channels_last {self.channels_last}"
        if not self.seconds_per_step:
            return f"{what} ({self.source})"
        base = self.seconds_per_step.get(_label("no", False)) or max(self.seconds_per_step.values())
        ratios = ", ".join(f"{k} x{base / v:.2f}" for k, v in self.seconds_per_step.items())
        return f"{what} (auto, {self.source}: steps/s vs fp32: {ratios})"

    def to_json(self) -> dict:
        return asdict(self)


def _label(mixed: str, channels_last: bool) -> str:
    name = "fp32" if mixed == "no" else mixed
    return f"{name} channels_last" if channels_last else name


def is_auto(spec: Spec) -> bool:
    return spec.train.mixed_precision == "auto" or spec.train.channels_last == "auto"


def fixed_precision(spec: Spec) -> Precision:
    """The spec's own setting, with any ``auto`` left unresolved read as fp32 / contiguous."""
    t = spec.train
    mixed = "no" if t.mixed_precision == "auto" else t.mixed_precision
    return Precision(mixed, t.channels_last is True, "spec")


def recorded_precision(run_dir: Path) -> Precision | None:
    """What the run in ``run_dir`` trained with (``precision.json``), if it recorded it."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return Precision(
        saved["mixed_precision"], bool(saved["channels_last"]), "run", saved.get("seconds_per_step", {})
    )


def write_record(run_dir: Path, precision: Precision) -> None:
    (Path(run_dir) / RUN_FILE).write_text(json.dumps(precision.to_json(), indent=1))


def candidates(spec: Spec, device: torch.device) -> list[tuple[str | None, bool]]:
    """(mixed precision, channels_last) pairs worth timing for this spec on ``device``."""
    t = spec.train
    if t.mixed_precision != "auto":
        precisions: list[str | None] = [t.mixed_precision]
    elif device.type == "cuda":
        precisions = ["bf16" if torch.cuda.is_bf16_supported() else "no"]
    else:
        precisions = ["no", "bf16"] if cpu_has_fast_bf16() else ["no"]
    layouts = [False, True] if t.channels_last == "auto" else [bool(t.channels_last)]
    return [(p, c) for p in precisions for c in layouts]


def cpu_has_fast_bf16() -> bool:
    """oneDNN has native bf16 kernels here (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


# ---------------------------------------------------------------------------------------- cache keys
def machine_key(device: torch.device) -> dict:
    """What about this machine decides which precision is fastest."""
    key: dict = {"torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        key.update(gpu=props.name, capability=f"{props.major}.{props.minor}")
    else:
        model, flags = cpu_model_and_flags()
        key.update(cpu=model, flags=flags, threads=torch.get_num_threads())
    return key


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and its flags that matter for speed (AVX-512, bf16, VNNI, AMX), from cpuinfo."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif name.strip() == "flags":
            wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx")
            flags = sorted(f for f in value.split() if f.startswith(wanted))
            break
    return model, flags


def machine_line() -> str:
    """The machine a figure was measured on: CPU model, speed-relevant flags, threads, torch, GPU."""
    model, flags = cpu_model_and_flags()
    threads = torch.get_num_threads()
    line = f"CPU: {model}, {threads} threads, flags {' '.join(flags) or '-'}; torch {torch.__version__}"
    if torch.cuda.is_available():
        line += f"; GPU: {torch.cuda.get_device_name()}"
    return line


def shape_key(spec: Spec, batch_per_process: int, options: list[tuple[str | None, bool]]) -> dict:
    """Everything in the spec that changes the cost of a step (not paths, lrs, epochs or seeds)."""
    keep = {"arch", "kwargs", "weight_bits", "act_bits", "trainable"}
    networks = [{k: v for k, v in m.model_dump().items() if k in keep} for m in spec.resolved_teachers()]
    return {
        "method": spec.method,
        "student": {k: v for k, v in spec.student.model_dump().items() if k in keep},
        "teachers": networks,
        "quantizer": spec.quantizer.model_dump(),
        "surgery": [s.model_dump() for s in spec.surgery],
        "taps": spec.taps.model_dump(),
        "distill": spec.distill.model_dump(),
        "input": list(spec.data.input_shape()),
        "batch": batch_per_process,
        "optimizer": spec.optim.name,
        "candidates": [_label(p or "no", c) for p, c in options],
    }


def cache_path() -> Path:
    """``$CMTKD_GRAPH_CACHE_DIR/precision.json`` (default ``~/.cache/cmtkd_graph``, XDG respected)."""
    root = os.environ.get("CMTKD_GRAPH_CACHE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cmtkd_graph")
    return Path(root) / "precision.json"


def _key(machine: dict, shape: dict) -> str:
    return hashlib.sha256(json.dumps([machine, shape], sort_keys=True).encode()).hexdigest()[:24]


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, entry: dict) -> None:
    """Add one entry; a cache that cannot be written only costs a probe next time."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as err:
        log.warning(f"precision cache {path} not written ({err}); the next run probes again")


# ---------------------------------------------------------------------------------------- probing
def resolve_precision(spec: Spec, state, *, recorded: Precision | None = None) -> Precision:
    """The run's precision: the spec's, a resumed run's own record, or ``auto`` timed on the main process
    (:func:`choose_precision`) and shared with every process.

    ``state`` is accelerate's ``PartialState`` (``runtime.process.distributed_state``): the choice is made
    before any Accelerator exists, because the Accelerator is created with it."""
    from accelerate.utils import broadcast_object_list

    if recorded is not None and is_auto(spec):
        return recorded
    if not is_auto(spec):
        return fixed_precision(spec)
    accum = spec.train.grad_accum_steps or 1
    per_process = max(spec.data.batch_size // (state.num_processes * accum), 1)
    chosen: list[Precision | None] = [None]
    if state.is_main_process:
        chosen = [cached_choice(spec, state.device, per_process)]
        if chosen[0] is None:
            log.info("precision auto: timing a few training steps of each candidate (cached afterwards)")
            chosen = [choose_precision(spec, state.device, per_process)]
    if state.num_processes > 1:
        broadcast_object_list(chosen)
    return chosen[0]


def known_precision(spec: Spec, device: torch.device, batch_per_process: int) -> Precision | None:
    """What a run of ``spec`` would train with, decided without probing: the spec's own setting, the only
    candidate, or the cached choice; None while ``auto`` has not been probed for this machine and shape
    (the study's estimates use it)."""
    if not is_auto(spec):
        return fixed_precision(spec)
    options = candidates(spec, device)
    if len(options) == 1:
        mixed, channels_last = options[0]
        return Precision(mixed, channels_last, "only candidate")
    return cached_choice(spec, device, batch_per_process)


def cached_choice(spec: Spec, device: torch.device, batch_per_process: int) -> Precision | None:
    """The cached choice for this machine and spec shape, if one was probed before."""
    options = candidates(spec, device)
    entry = _read_cache().get(_key(machine_key(device), shape_key(spec, batch_per_process, options)))
    if entry is None:
        return None
    return Precision(entry["mixed_precision"], entry["channels_last"], "cache", entry["seconds_per_step"])


def choose_precision(spec: Spec, device: torch.device, batch_per_process: int) -> Precision:
    """The spec's precision with every ``auto`` resolved: from the cache, or by timing the candidates."""
    known = known_precision(spec, device, batch_per_process)
    if known is not None:
        return known
    options = candidates(spec, device)
    times = probe(spec, device, batch_per_process, options)
    chosen = pick(times)
    mixed, channels_last = next((p, c) for p, c in options if _label(p or "no", c) == chosen)
    precision = Precision(mixed, channels_last, "probe", times)
    machine = machine_key(device)
    _write_cache(
        _key(machine, shape_key(spec, batch_per_process, options)),
        {**precision.to_json(), "machine": machine, "date": time.strftime("%Y-%m-%d")},
    )
    return precision


def pick(seconds_per_step: dict[str, float]) -> str:
    """The fastest candidate, unless it beats the first (fp32/contiguous) by less than ``MARGIN``."""
    first = next(iter(seconds_per_step))
    fastest = min(seconds_per_step, key=seconds_per_step.__getitem__)
    if seconds_per_step[fastest] < (1 - MARGIN) * seconds_per_step[first]:
        return fastest
    return first


def probe(
    spec: Spec,
    device: torch.device,
    batch_per_process: int,
    options: list[tuple[str | None, bool]],
    *,
    repeat: int = PROBE_STEPS,
    summary: Callable[[list[float]], float] = min,
) -> dict[str, float]:
    """Seconds per training step of each candidate: the best (``summary``) of ``repeat`` rounds after a
    warm-up, the candidates taking turns in every round, so that a machine slowing down or speeding up
    meanwhile (other jobs, frequency scaling) affects all of them alike.

    Runs under a forked RNG, so a probed run trains exactly as an unprobed one with the same choice.
    """
    from cmtkd_graph.optim import build_optimizer
    from cmtkd_graph.system import build_system

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        base = build_system(spec, load=False).to(device)
        classes = base.num_classes() or 2
        images = torch.randn(batch_per_process, *spec.data.input_shape(), device=device)
        task = task_record(spec.student.arch)
        labels = task.example_labels(batch_per_process, classes, spec.data.input_shape(), device, spec)
        steps = {}
        for mixed, channels_last in options:
            system = copy.deepcopy(base)
            x = images
            if channels_last:
                system = channels_last_module(system)
                x = channels_last_tensor(images)
            optimizer = build_optimizer(system, spec)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed or "no")

            def step(system=system, optimizer=optimizer, x=x, dtype=dtype) -> None:
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    _, terms = system(x, labels)  # as the trainer calls it: forward and objective
                terms["total"].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            steps[_label(mixed or "no", channels_last)] = step
        return interleaved_best(steps, repeat, device=device, summary=summary)


def interleaved_best(
    steps: dict[str, Callable[[], object]],
    repeat: int = PROBE_STEPS,
    warmup: int = 1,
    device: torch.device | None = None,
    summary: Callable[[list[float]], float] = min,
) -> dict[str, float]:
    """Best wall time (s) of each callable over `repeat` rounds after `warmup` calls each.

    The callables alternate within every round, so drift of a shared machine (another job starting,
    turbo clocks) hits all of them alike; the best of the rounds is the least disturbed one, the one to
    compare candidates by. ``summary=statistics.median`` gives a typical call instead (what planning a
    run's length needs). On CUDA the device is synchronised around each call so the time is the
    kernels', not the launch's.
    """
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else None
    for step in steps.values():
        for _ in range(warmup):  # allocations, oneDNN primitive caches, cuDNN autotuning
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            if sync:
                sync(device)
            start = time.perf_counter()
            step()
            if sync:
                sync(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: summary(times) for name, times in seconds.items()}
