"""Stage `train`: fit the model on the TFRecord shards and save it with its provenance.

Reads  params `common`, `train` (and `tracking` for the store check); --tfrecords manifests/shards.
Writes --model (.keras: raw 0..255 RGB in, probabilities out), --meta (model_meta.json: classes
       in column order, image size and resize mode, shard encoding, where calibrate's thresholds
       are, seed, resolved params), --summary (Keras's layer table, packed with the model), --history (per-epoch CSV, DVC plots), --metrics (best epoch,
       epochs run, best monitored value: DVC metrics). Timing and throughput differ on every
       run, so they go to the journal (`journal.py`) for the MLflow run, not into a DVC output.
       With `train.resume`, the state after each epoch goes to .mlic/train-resume/ (outside git and
       DVC, removed on success): a killed run, re-run, continues there with the same results.
Run alone: python stages/train.py --tfrecords data/tfrecords --model models/model.keras \
           --meta models/model_meta.json --summary models/model_summary.txt --history reports/train/history.csv --metrics reports/train/metrics.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
from pathlib import Path

from mlic.console import quiet_tensorflow

if __name__ == "__main__":  # before the imports below load TensorFlow; tests calling main() keep pytest's stderr
    quiet_tensorflow()

from mlic import augment, dataset, devices as mlic_devices, journal, losses, model as mlic_model, model_file, resume, store, training
from mlic.atomic import atomic_path, write_csv, write_json
from mlic.model_meta import ModelMeta
from mlic.stage import Params, Stage
from mlic.tfrecords import Manifest

log = logging.getLogger("mlic.stages.train")


SECTIONS = ("common", "train")


def add_args(ap: argparse.ArgumentParser) -> None:
    for flag in ("--tfrecords", "--model", "--meta", "--summary", "--history", "--metrics"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--thresholds-source", default="reports/calibrate/thresholds.json",
                    help="where calibrate writes the thresholds (recorded in --meta for `mlic predict`)")


def run(args: argparse.Namespace, params: Params) -> int:
    common, cfg = params.common, params.train
    # Say so now, in one line (TrackingUnavailable), rather than after a long training.
    store.check_store(store.resolve_tracking_uri(params.tracking.uri, Path.cwd()))

    mlic_devices.set_seed(common.seed)
    devices = mlic_devices.configure_devices(cfg.mixed_precision, cfg.jit_compile, cfg.deterministic_ops,
                                                   cfg.intra_op_threads)
    train_m, val_m = Manifest.read(args.tfrecords, "train"), Manifest.read(args.tfrecords, "val")
    classes, size = train_m.classes, train_m.image_size
    if (val_m.classes, val_m.image_size, val_m.resize_mode) != (classes, size, train_m.resize_mode):
        log.error("train and val shards disagree on classes, image size or resize mode; "
                  "re-run `dvc repro preprocess`")
        return 2
    aug = augment.Augmentation.from_params(cfg)
    train_epochs = functools.partial(dataset.make_dataset, train_m, cfg.batch_size, shuffle=True, augment=aug,
                                     seed=common.seed, shuffle_buffer=cfg.shuffle_buffer,
                                     repeat_threshold=cfg.repeat_threshold)  # epochs=range(a, b)
    val_ds = dataset.make_dataset(val_m, cfg.batch_size)
    pretrained = cfg.weights is not None
    # Epoch-by-epoch state in .mlic/train-resume/<key>/ (outside git and DVC): a killed train re-run
    # continues where it stopped (resume.py); removed once every output is written.
    # tta_flip shapes only the saved file, not the training: it is not part of the resume key.
    saved = (resume.Resume.for_run({k: v for k, v in dataclasses.asdict(cfg).items() if k != "tta_flip"}, common.seed,
                                   {"train": train_m.fingerprint, "val": val_m.fingerprint})
             if cfg.resume else None)
    with devices.strategy.scope():
        model = mlic_model.from_params(cfg, len(classes), size, common.seed)
        loss = losses.loss_from_params(cfg, train_m.prevalence)
        with atomic_path(args.model) as tmp:
            ckpt = tmp.with_suffix(".keras")  # Keras insists on the extension
            try:
                result = training.fit(model, train_epochs, val_ds, cfg=cfg, n_classes=len(classes),
                                      n_train=train_m.count, checkpoint=ckpt, loss=loss,
                                      jit_compile=devices.jit_compile, pretrained=pretrained, resume=saved)
                if mlic_model.flips_at_test_time(cfg):
                    # The best checkpoint, wrapped: the file every later stage and server loads.
                    model = mlic_model.with_flip_tta(mlic_model.load_model(ckpt))
                    model.save(ckpt)
                elif cfg.tta_flip:
                    log.info("tta_flip is off: augment_flip is false, so a mirror image may not keep its labels")
                model_file.make_deterministic(ckpt)  # same weights, same bytes: DVC skips what follows
                ckpt.replace(tmp)
            finally:  # atomic_path removes its own temp file, not this one
                ckpt.unlink(missing_ok=True)

    write_csv(args.history, result.history)
    with atomic_path(args.summary) as tmp:
        tmp.write_text(mlic_model.summary_text(model), encoding="utf-8")
    ModelMeta(classes=classes, image_size=size, resize_mode=train_m.resize_mode, encoding=train_m.encoding,
              jpeg_quality=train_m.jpeg_quality, thresholds=args.thresholds_source, backbone=cfg.backbone,
              seed=common.seed, train=dataclasses.asdict(cfg),
              data_fingerprints={"train": train_m.fingerprint, "val": val_m.fingerprint},
              parameters=int(model.count_params())).write(args.meta)
    write_json(args.metrics, {
        "best_epoch": result.best_epoch, f"best_{cfg.monitor}": round(result.best_value, 6),
        "epochs_run": len(result.history),
    })
    if saved is not None:
        saved.clear()
    # What ran, not what was asked for: MLflow tags train.jit_compile etc. (params hold the requests).
    used = os.times()  # what `time` reports for this stage: user + sys, its worker processes included
    journal.note(cpu_seconds=round(used.user + used.system + used.children_user + used.children_system, 1),
                 epoch_cpu_seconds=",".join(f"{t:.1f}" for t in result.epoch_cpu_seconds),
                 fit_seconds=round(result.seconds, 1),
                 images_per_second=round(result.images_seen / max(result.seconds, 1e-9), 1),
                 jit_compile=_on(result.jit_compile), mixed_precision=_on(devices.mixed_precision),
                 progressive=result.progressive, tta_flip=_on(mlic_model.flips_at_test_time(cfg)),
                 deterministic_ops=_on(devices.deterministic_ops), intra_op_threads=devices.intra_op_threads,
                 devices=_devices_text(devices))
    log.info("best %s %.4f at epoch %d; %d epochs in %.0f s", cfg.monitor, result.best_value,
             result.best_epoch, len(result.history), result.seconds)
    return 0


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _devices_text(devices: mlic_devices.DeviceConfig) -> str:
    replicas = devices.strategy.num_replicas_in_sync
    return f"{devices.gpus} GPU" + (f", {replicas} replicas" if replicas > 1 else "") if devices.gpus else "CPU"


# `tracking` is read only to check the store before training: it shapes no output, so it is not
# one of train's DVC params (changing the tracking URI must not retrain).
main = Stage(__doc__, SECTIONS, add_args, run, checks=("tracking",))

if __name__ == "__main__":
    main.script()
