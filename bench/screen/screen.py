"""Scratch screening: train one architecture variant on hard shards, report val/test quality + CPU."""
import argparse, json, os, sys, time, functools, dataclasses
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src")); sys.path.insert(0, str(ROOT / "bench" / "screen"))
ap = argparse.ArgumentParser()
ap.add_argument("--tf", required=True)
ap.add_argument("--arch", default="simple_cnn")
ap.add_argument("--set", nargs="*", default=[])
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--out", required=True)
ap.add_argument("--extra", nargs="*", default=[])
ap.add_argument("--ema", type=float, default=0)
a = ap.parse_args()
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(a.threads)
tf.config.threading.set_inter_op_parallelism_threads(a.threads)
import keras, numpy as np, yaml
from mlic import augment, dataset, devices as D, losses, model as M, training, thresholds, predictions
from mlic.params import Train, section_from_dict
from mlic.tfrecords import Manifest
from sklearn.metrics import average_precision_score, f1_score
import arches
arches.register(M)

raw = yaml.safe_load(open(ROOT / "params.yaml"))["train"]
for kv in a.set:
    k, v = kv.split("=", 1)
    raw[k] = yaml.safe_load(v)
raw["backbone"] = "simple_cnn"
raw["resume"] = False
cfg = section_from_dict(Train, raw, "train")
D.set_seed(42)
dev = D.configure_devices("off", "off", "auto")
tm, vm, sm = (Manifest.read(a.tf, s) for s in ("train", "val", "test"))
aug = augment.Augmentation(cfg.augment_flip, cfg.augment_rotation, cfg.augment_zoom, cfg.augment_contrast)
te = functools.partial(dataset.make_dataset, tm, cfg.batch_size, shuffle=True, augment=aug, seed=42,
                       shuffle_buffer=cfg.shuffle_buffer, repeat_threshold=cfg.repeat_threshold)
vds = dataset.make_dataset(vm, cfg.batch_size)
import extra_aug
te = extra_aug.wrap(te, a.extra)
k = len(tm.classes)
size = tm.image_size
if a.arch in M.BACKBONES:
    model = M.build_model(a.arch, k, size, dropout=cfg.dropout, seed=42, width=cfg.width, pool=cfg.pool)
else:
    model = arches.build(a.arch, k, size, cfg)
print("params", model.count_params(), flush=True)
loss = losses.loss_from_params(cfg, tm.prevalence)
if a.ema:
    def _c(model, lr, loss, n_classes, jit):
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr, use_ema=True, ema_momentum=a.ema), loss=loss,
                      metrics=losses.make_metrics(n_classes), jit_compile=jit)
    training._compile = _c
    _fit = training.fit
    def fit2(*args, callbacks=(), **kw):
        return _fit(*args, callbacks=callbacks, **kw)
    orig_MC = keras.callbacks.ModelCheckpoint
    class MC(orig_MC):
        pass
    # SwapEMAWeights must run before the checkpoint: put it first via LearningRateLogger slot
    orig_LRL = training.LearningRateLogger
    class LRL(orig_LRL):
        def __init__(self):
            super().__init__(); self.swap = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)
        def set_model(self, m):
            super().set_model(m); self.swap.set_model(m)
        def set_params(self, p):
            super().set_params(p); self.swap.set_params(p)
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs); self.swap.on_epoch_end(epoch, logs)
        def on_test_begin(self, logs=None): self.swap.on_test_begin(logs)
        def on_test_end(self, logs=None): self.swap.on_test_end(logs)
        def on_epoch_begin(self, epoch, logs=None): self.swap.on_epoch_begin(epoch, logs)
    training.LearningRateLogger = LRL
ck = os.path.join(__import__("tempfile").gettempdir(), f"mlic_screen_{os.getpid()}.keras")
t0 = os.times()
res = training.fit(model, te, vds, cfg=cfg, n_classes=k, n_train=tm.count, checkpoint=__import__("pathlib").Path(ck), loss=loss)
t1 = os.times()
model.load_weights(ck)
pv = predictions.predict_split(model, vm, 64)
pt = predictions.predict_split(model, sm, 64)
fit = thresholds.fit(pv.y_true, pv.y_prob, "fbeta", min_support=10)
yp = (pt.y_prob >= fit.thresholds).astype(int)
f1s = f1_score(pt.y_true, yp, average=None, zero_division=0)
aps = [average_precision_score(pt.y_true[:, j], pt.y_prob[:, j]) for j in range(k)]
vaps = [average_precision_score(pv.y_true[:, j], pv.y_prob[:, j]) for j in range(k)]
out = {"arch": a.arch, "set": a.set, "size": size, "cpu_s": t1.user + t1.system - t0.user - t0.system,
       "wall_s": res.seconds, "epochs": len(res.history), "best_epoch": res.best_epoch,
       "val_map": float(np.mean(vaps)), "test_map": float(np.mean(aps)), "test_f1cal": float(np.mean(f1s)),
       "per_class_f1": dict(zip(tm.classes, np.round(f1s, 2).tolist())),
       "curve": res.history["val_auc_pr"].round(4).tolist(), "cpu_curve": [round(c, 1) for c in res.epoch_cpu_seconds],
       "params": int(model.count_params())}
json.dump(out, open(a.out, "w"), indent=1)
print(json.dumps({kk: out[kk] for kk in ("arch", "set", "size", "cpu_s", "epochs", "best_epoch", "val_map", "test_map", "test_f1cal")}))
print(out["per_class_f1"])
os.unlink(ck)
