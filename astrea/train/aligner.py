"""Progressive momentum-contrastive pre-alignment of Astrea's experts, then instruction tuning.

Stages run Caption -> Classification -> Detection -> Segmentation -> Instruct. In the
alignment stage of expert ``e`` every expert aligned so far (the scope widens stage by
stage) is trained with

* a momentum contrast (:class:`astrea.nn.MomentumContrast`): the pooled adapter output of
  the expert is the query, the caption embedded by the momentum (EMA) copy of the text
  encoder is the key, negatives come from a queue of earlier keys;
* an in-batch image-text InfoNCE that trains the online text encoder the keys follow;
* the expert's task head loss (caption words, class, boxes, mask).

The Instruct stage freezes the experts and their adapters and trains the router (with the
instruction embedding as extra input), the weight allocator and the language decoder on
captioning and question answering, plus the router's load-balancing and z losses; the
allocator's selection bias follows the expert loads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from astrea import distributed
from astrea.data import PROMPT_LEN, TASKS, Scenes, Vocabulary, generate_scenes
from astrea.data.shapes import CAPTION_LEN
from astrea.data.text import CLASS_NAMES
from astrea.models.astrea import Astrea
from astrea.models.experts import EXPERTS, box_iou
from astrea.models.language import TextEncoder, TinyDecoder
from astrea.train import metrics
from astrea.train.config import AlignConfig

CHECKPOINT_FORMAT = "astrea.ProgressiveAligner/1"
_EVAL_CHUNK = 128


def _task_target(expert: str, batch: Scenes) -> torch.Tensor:
    return {"detection": batch.boxes, "segmentation": batch.masks, "classification": batch.labels,
            "caption": batch.captions}[expert]


class _StageLosses(nn.Module):
    """The current stage's losses as one ``forward`` over ``net``: the module DDP wraps."""

    def __init__(self, aligner: "ProgressiveAligner"):
        super().__init__()
        self.net = aligner.net
        self.aligner = aligner

    def forward(self, batch: Scenes, tasks: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.aligner.stage == "instruct":
            return self.aligner._instruct_losses(batch, tasks)
        return self.aligner._align_losses(batch)


class ProgressiveAligner:
    """Trains an :class:`~astrea.models.Astrea` through the stages of ``config.schedule``.

    ``train_step()`` runs one step of the current stage and moves to the next stage when
    the current one is done (evaluating it: :attr:`history`); ``save``/``load`` write and
    restore everything the next step depends on (weights, queues and their pointers,
    optimizer, RNG, stage position), so a resumed run continues exactly.
    """

    def __init__(self, config: AlignConfig):
        self.config = config
        torch.manual_seed(config.seed)
        self.vocab = Vocabulary()
        self.train_set = generate_scenes(config.train_scenes, seed=config.seed, image_size=config.image_size)
        self.eval_set = generate_scenes(config.eval_scenes, seed=config.seed + 1, image_size=config.image_size,
                                        split="eval")
        from astrea.nn import MomentumContrast

        dim, vocab_size, pad = config.dim, len(self.vocab), self.vocab.pad
        text = TextEncoder(vocab_size, dim, CAPTION_LEN, pad)
        self.net = nn.ModuleDict({
            "model": Astrea(vocab_size, pad, image_size=config.image_size, num_classes=len(CLASS_NAMES), dim=dim,
                            num_tokens=config.num_tokens, top_k=config.top_k, residual_p=config.residual_p,
                            seed=config.seed),
            "decoder": TinyDecoder(vocab_size, dim, config.num_tokens + PROMPT_LEN, pad),
            "text": text,
            "text_key": copy.deepcopy(text).requires_grad_(False),
            "align_proj": nn.ModuleDict({name: nn.Linear(dim, dim) for name in EXPERTS}),
            "contrast": nn.ModuleDict({
                name: MomentumContrast(dim, queue_size=config.queue_size, momentum=config.momentum,
                                       temperature=config.temperature)
                for name in EXPERTS}),
        })
        # data parallel: batch statistics of the global batch; distinct random streams per rank
        distributed.global_batchnorm(self.net)
        distributed.seed_rank(config.seed)
        self.stage_index = 0
        self.step = 0  # within the stage
        self.global_step = 0
        self.history: list[dict] = []
        self._stage_log: dict[str, list[float]] = {}
        self.optimizer = self._make_optimizer()

    # -- stage bookkeeping ---------------------------------------------------------------

    @property
    def model(self) -> Astrea:
        return self.net["model"]

    @property
    def finished(self) -> bool:
        return self.stage_index >= len(self.config.stages)

    @property
    def stage(self) -> str:
        return self.config.stages[self.stage_index]

    def scope(self) -> tuple[str, ...]:
        """The experts trained in the current alignment stage: this one and all earlier ones."""
        stages = self.config.stages
        return tuple(name for name in stages[: self.stage_index + 1] if name in EXPERTS)

    def _trainable(self) -> list[nn.Module]:
        model = self.model
        if self.stage == "instruct":
            return [*model.fusion_modules(), self.net["decoder"]]
        scope = self.scope()
        modules = [self.net["text"]]
        for name in scope:
            modules += [model.experts[name], model.adapters[name], model.heads[name], self.net["align_proj"][name]]
        return modules

    def _make_optimizer(self) -> torch.optim.Optimizer:
        self.net.requires_grad_(False)
        modules = self._trainable()
        for module in modules:
            module.requires_grad_(True)
        params = [p for module in modules for p in module.parameters()]
        # data parallel: DDP fixes its gradient buckets to the trainable parameters, so it is rebuilt
        # with them; every buffer (queues, allocator bias, batch-norm statistics) is updated from
        # global quantities, identically on every rank, so none is copied from rank 0
        self._losses = distributed.wrap_ddp(_StageLosses(self), sync_buffers=False)
        return torch.optim.AdamW(params, lr=self._learning_rate(), weight_decay=self.config.weight_decay)

    def _learning_rate(self) -> float:
        """Linear warm-up, then cosine decay to 10% over the stage."""
        cfg = self.config
        base = cfg.lr_instruct if self.stage == "instruct" else cfg.lr_align
        total = cfg.stage_steps(self.stage)
        warm = min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
        progress = self.step / max(1, total - 1)
        return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def _batch(self) -> tuple[Scenes, torch.Tensor]:
        """The batch and per-sample tasks of this step: a function of (seed, stage, step) only."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.stage_index * 10_007 + self.step)
        index = torch.randint(len(self.train_set), (cfg.batch_size,), generator=generator)
        tasks = torch.randint(len(TASKS), (cfg.batch_size,), generator=generator)
        # data parallel: batch_size is the global batch; each rank takes its contiguous part
        index, tasks = distributed.shard_batch(index), distributed.shard_batch(tasks)
        return self.train_set.select(index), tasks

    def _set_modes(self) -> None:
        self.net.train()
        if self.stage == "instruct":
            self.model.experts.eval()  # frozen: BatchNorm statistics stay those of pre-alignment
        self.net["text_key"].eval()

    # -- steps ---------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimisation step of the current stage; returns its losses."""
        if self.finished:
            raise RuntimeError("ProgressiveAligner.train_step: all stages are done")
        self._set_modes()
        for group in self.optimizer.param_groups:
            group["lr"] = self._learning_rate()
        batch, tasks = self._batch()
        losses = self._losses(batch, tasks)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        if self.stage == "instruct":
            self.model.allocator.update_bias(losses.pop("counts"))
        else:
            self.net["contrast"][self.stage].momentum_update(self.net["text"], self.net["text_key"])
        names = list(losses)  # data parallel: the losses of the global batch
        logged = dict(zip(names, distributed.mean_over_ranks(torch.stack([losses[n] for n in names])).tolist()))
        for name, value in logged.items():
            self._stage_log.setdefault(name, []).append(value)
        self.step += 1
        self.global_step += 1
        if self.step == self.config.stage_steps(self.stage):
            self._finish_stage()
        return logged

    def _align_losses(self, batch: Scenes) -> dict[str, torch.Tensor]:
        model, scope = self.model, self.scope()
        raw, adapted = model.encode(batch.images, scope)
        text = distributed.gather_batch(self.net["text"](batch.captions))  # in-batch negatives of all ranks
        with torch.no_grad():
            keys = F.normalize(self.net["text_key"](batch.captions), dim=-1)
        total, losses = 0.0, {}
        for name in scope:
            query = F.normalize(self.net["align_proj"][name](adapted[name].mean(1)), dim=-1)
            contrast = self.net["contrast"][name](query, keys)
            in_batch = metrics.in_batch_info_nce(distributed.gather_batch(query), text, self.config.temperature)
            head = model.heads[name]
            task = head.loss(head(raw[name]), _task_target(name, batch))
            total = total + contrast + in_batch + task
            if name == self.stage:
                losses.update(contrastive_loss=contrast.detach(), task_loss=task.detach())
        losses["loss"] = total
        return losses

    def _instruct_losses(self, batch: Scenes, tasks: torch.Tensor) -> dict[str, torch.Tensor]:
        model, decoder = self.model, self.net["decoder"]
        rows = torch.arange(len(tasks))
        with torch.no_grad():  # experts and adapters stay as pre-alignment left them
            _, adapted = model.encode(batch.images)
        instruction = decoder.instruction_embedding(batch.instructions[rows, tasks])
        cfg = self.config
        # Each step draws fresh residual masks: its global batch owns batch_size * num_tokens
        # counters of the Philox stream. Data parallel: this rank starts at its first token row.
        first_row = distributed.rank() * len(tasks) * cfg.num_tokens
        offset = self.global_step * cfg.batch_size * cfg.num_tokens + first_row
        fused = model.fuse(adapted, instruction, offset=offset)
        answer_mask = batch.answer_mask[rows, tasks]
        lm_loss, _, _ = decoder.loss_and_accuracy(fused.tokens, batch.prompts[rows, tasks], answer_mask)
        # data parallel: the mean over all ranks' answer tokens; router load of the global batch
        lm_loss = distributed.as_global_mean(lm_loss, answer_mask[:, 1:].sum())
        stats = distributed.all_reduce_router_stats(fused.counts, fused.router_probs.sum(0), len(tasks))
        # one process: the router op's own loss, bit for bit (router_probs sums round differently)
        balance_loss = stats.load_balancing_loss(model.top_k) if distributed.is_distributed() else fused.aux_loss
        loss = lm_loss + cfg.balance_coef * balance_loss + cfg.z_loss_coef * fused.z_loss
        return {"loss": loss, "lm_loss": lm_loss.detach(), "balance_loss": balance_loss.detach(),
                "counts": stats.counts}

    def _finish_stage(self) -> None:
        log = {name: sum(values) / len(values) for name, values in self._stage_log.items()}
        self.history.append({"stage": self.stage, "steps": self.step, "train": log, "eval": self.evaluate()})
        self._stage_log = {}
        self.stage_index += 1
        self.step = 0
        if not self.finished:
            self.optimizer = self._make_optimizer()

    def record_initial_evaluation(self) -> None:
        """Evaluates the untrained model as the first :attr:`history` entry ("init")."""
        if self.history or self.global_step:
            raise RuntimeError("ProgressiveAligner.record_initial_evaluation: training has already started")
        self.history.append({"stage": "init", "steps": 0, "train": {}, "eval": self.evaluate()})

    def run(self, progress: bool = True, on_stage_end=None) -> list[dict]:
        """Trains to the end of the schedule with one progress bar per stage; calls
        ``on_stage_end(self)`` after each stage. Returns :attr:`history`."""
        from tqdm.auto import tqdm

        while not self.finished:
            index, stage = self.stage_index, self.stage
            label = f"stage {index + 1}/{len(self.config.stages)} {stage}"
            with tqdm(total=self.config.stage_steps(stage), initial=self.step, desc=label, disable=not progress) as bar:
                while self.stage_index == index:
                    logged = self.train_step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{logged['loss']:.3f}")
            if on_stage_end is not None:
                on_stage_end(self)
        return self.history

    # -- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Measures every expert, the decoder and the router on the evaluation scenes."""
        was_training = self.net.training
        self.net.eval()
        model, decoder, scenes = self.model, self.net["decoder"], self.eval_set
        keys, queries, heads = [], {name: [] for name in EXPERTS}, {name: [] for name in EXPERTS}
        per_task = {task: {"probs": [], "token_hits": [], "exact": []} for task in TASKS}
        counts = torch.zeros(len(EXPERTS))
        for start in range(0, len(scenes), _EVAL_CHUNK):
            chunk = scenes.select(torch.arange(start, min(start + _EVAL_CHUNK, len(scenes))))
            raw, adapted = model.encode(chunk.images)
            keys.append(self.net["text_key"](chunk.captions))
            for name in EXPERTS:
                queries[name].append(self.net["align_proj"][name](adapted[name].mean(1)))
                heads[name].append(model.heads[name](raw[name]))
            for t, task in enumerate(TASKS):
                fused = model.fuse(adapted, decoder.instruction_embedding(chunk.instructions[:, t]))
                _, token_hits, exact = decoder.loss_and_accuracy(fused.tokens, chunk.prompts[:, t],
                                                                 chunk.answer_mask[:, t])
                per_task[task]["probs"].append(fused.router_probs)
                per_task[task]["token_hits"].append(token_hits)
                per_task[task]["exact"].append(exact)
                counts += fused.counts.float().cpu()
        keys = torch.cat(keys)
        cat = {name: torch.cat(values) for name, values in heads.items()}
        temperature = self.config.temperature
        result = {
            "retrieval_top1": {name: metrics.retrieval_top1(torch.cat(q), keys, scenes.captions)
                               for name, q in queries.items()},
            "contrastive_loss": {name: metrics.in_batch_info_nce(torch.cat(q), keys, temperature).item()
                                 for name, q in queries.items()},
            "classification_accuracy": (cat["classification"].argmax(-1) == scenes.labels).float().mean().item(),
            "box_iou": box_iou(cat["detection"], scenes.boxes).mean().item(),
            "mask_iou": metrics.mask_iou(cat["segmentation"], scenes.masks),
            "caption_token_accuracy": torch.cat(per_task["caption"]["token_hits"]).float().mean().item(),
            "qa_accuracy": {task: torch.cat(per_task[task]["exact"]).float().mean().item() for task in TASKS[1:]},
            "router_probs": {task: torch.cat(v["probs"]).mean(0).tolist() for task, v in per_task.items()},
            "load_share": dict(zip(EXPERTS, (counts / counts.sum()).tolist())),
            "load_cv": metrics.coefficient_of_variation(counts),
        }
        self.net.train(was_training)
        return result

    # -- checkpoints ---------------------------------------------------------------------

    def save(self, path) -> None:
        """Writes a safetensors checkpoint of everything the next step depends on."""
        from safetensors.torch import save_file

        tensors = {f"net.{k}": v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}
        optim = self.optimizer.state_dict()
        for index, state in optim["state"].items():
            for key, value in state.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).clone().contiguous()
        # data parallel: every rank calls save (the RNG states are gathered); rank 0 writes
        for rank, state in enumerate(distributed.rng_states()):
            tensors[f"rng.torch.{rank}"] = state["cpu"]
        position = {"stage_index": self.stage_index, "step": self.step, "global_step": self.global_step}
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "config": json.dumps(dataclasses.asdict(self.config)),
            "position": json.dumps(position),
            "history": json.dumps(self.history),
            "stage_log": json.dumps(self._stage_log),
            "optim_param_groups": json.dumps(optim["param_groups"]),
        }
        if distributed.is_main():
            save_file(tensors, str(path), metadata=metadata)
        distributed.barrier()

    @classmethod
    def load(cls, path) -> "ProgressiveAligner":
        """Rebuilds the aligner saved by :meth:`save` at the same position."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"ProgressiveAligner.load: {path} is not a {CHECKPOINT_FORMAT} checkpoint "
                             f"(format {metadata.get('format')!r})")
        tensors = load_file(str(path))
        aligner = cls(AlignConfig(**json.loads(metadata["config"])))
        aligner.net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
        position = json.loads(metadata["position"])
        aligner.stage_index, aligner.step = position["stage_index"], position["step"]
        aligner.global_step = position["global_step"]
        aligner.history = json.loads(metadata["history"])
        aligner._stage_log = json.loads(metadata["stage_log"])
        if not aligner.finished:
            aligner.optimizer = aligner._make_optimizer()
            state: dict[int, dict] = {}
            for key, value in tensors.items():
                if key.startswith("optim."):
                    _, index, name = key.split(".", 2)
                    state.setdefault(int(index), {})[name] = value
            aligner.optimizer.load_state_dict({"state": state,
                                               "param_groups": json.loads(metadata["optim_param_groups"])})
        ranks = sum(key.startswith("rng.torch.") for key in tensors)
        distributed.set_rng_states([{"cpu": tensors[f"rng.torch.{rank}"]} for rank in range(ranks)])
        return aligner
