"""Scratch: progressive resizing. Phase A at --low px (batches downscaled on the fly), phase B at full size."""
import argparse, json, os, sys, functools, math
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src")); sys.path.insert(0, str(ROOT / "bench" / "screen"))
ap = argparse.ArgumentParser()
ap.add_argument("--tf", required=True); ap.add_argument("--arch", default="s2cnn")
ap.add_argument("--low", type=int, default=64); ap.add_argument("--ea", type=int, default=40); ap.add_argument("--eb", type=int, default=40)
ap.add_argument("--set", nargs="*", default=[]); ap.add_argument("--out", required=True); ap.add_argument("--extra", nargs="*", default=[])
a = ap.parse_args()
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1); tf.config.threading.set_inter_op_parallelism_threads(1)
import keras, numpy as np, yaml
from mlic import augment, dataset, devices as D, losses, model as M, thresholds, predictions
from mlic.params import Train, section_from_dict
from mlic.tfrecords import Manifest
from sklearn.metrics import average_precision_score, f1_score
import arches, extra_aug; arches.register(M)
raw = yaml.safe_load(open(ROOT / "params.yaml"))["train"]
for kv in a.set:
    k, v = kv.split("=", 1); raw[k] = yaml.safe_load(v)
raw["backbone"] = "simple_cnn"; raw["resume"] = False
cfg = section_from_dict(Train, raw, "train")
D.set_seed(42); D.configure_devices("off", "off", "auto")
tm, vm, sm = (Manifest.read(a.tf, s) for s in ("train", "val", "test"))
k, S = len(tm.classes), tm.image_size
aug = augment.Augmentation(cfg.augment_flip, cfg.augment_rotation, cfg.augment_zoom, cfg.augment_contrast)
def tr(epochs, size):
    ds = dataset.make_dataset(tm, cfg.batch_size, shuffle=True, augment=aug, seed=42, shuffle_buffer=cfg.shuffle_buffer,
                              repeat_threshold=cfg.repeat_threshold, epochs=epochs)
    ds = extra_aug.wrap(lambda: ds, a.extra)()
    return ds if size == S else ds.map(lambda x, y: (tf.image.resize(x, (size, size), antialias=True), y))
def va(size):
    ds = dataset.make_dataset(vm, 64)
    return ds if size == S else ds.map(lambda x, y: (tf.image.resize(x, (size, size), antialias=True), y))
backbone = M.BACKBONES[a.arch].factory((None, None, 3), cfg.width)
pre = keras.layers.Rescaling(1 / 255.0); pool = keras.layers.GlobalAveragePooling2D() if cfg.pool == "avg" else keras.layers.GlobalMaxPooling2D()
drop = keras.layers.Dropout(cfg.dropout, seed=7); dense = keras.layers.Dense(k, activation="sigmoid")
def at(s):
    i = keras.Input((s, s, 3)); return keras.Model(i, dense(drop(pool(backbone(pre(i))))))
steps = math.ceil(tm.count / cfg.batch_size)
opt = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(cfg.learning_rate, (a.ea + a.eb) * steps))
loss = losses.loss_from_params(cfg, tm.prevalence)
t0 = os.times(); curve = []; cpu = []
class Rec(keras.callbacks.Callback):
    def on_epoch_end(self, e, logs=None):
        curve.append(round(float(logs["val_auc_pr"]), 4)); cpu.append(round(__import__("time").process_time(), 1))
if a.ea:
    lo = at(a.low); lo.compile(opt, loss, metrics=losses.make_metrics(k))
    lo.fit(tr(range(0, a.ea), a.low), steps_per_epoch=steps, validation_data=va(a.low), epochs=a.ea, verbose=2, callbacks=[Rec()])
hi = at(S); hi.compile(opt, loss, metrics=losses.make_metrics(k))
best = keras.callbacks.ModelCheckpoint(os.path.join(__import__("tempfile").gettempdir(), f"mlic_prog_{os.getpid()}.weights.h5"), monitor="val_auc_pr", mode="max", save_best_only=True, save_weights_only=True)
hi.fit(tr(range(a.ea, a.ea + a.eb), S), steps_per_epoch=steps, validation_data=va(S), epochs=a.ea + a.eb, initial_epoch=a.ea, verbose=2, callbacks=[Rec(), best])
t1 = os.times()
hi.load_weights(best.filepath)
pv = predictions.predict_split(hi, vm, 64); pt = predictions.predict_split(hi, sm, 64)
fit = thresholds.fit(pv.y_true, pv.y_prob, "fbeta", min_support=10)
f1s = f1_score(pt.y_true, (pt.y_prob >= fit.thresholds).astype(int), average=None, zero_division=0)
aps = [average_precision_score(pt.y_true[:, j], pt.y_prob[:, j]) for j in range(k)]
out = {"arch": a.arch, "low": a.low, "ea": a.ea, "eb": a.eb, "set": a.set, "cpu_s": t1.user + t1.system - t0.user - t0.system,
       "test_map": float(np.mean(aps)), "test_f1cal": float(np.mean(f1s)), "per_class_f1": dict(zip(tm.classes, np.round(f1s, 2).tolist())),
       "curve": curve, "cpu_curve": cpu}
json.dump(out, open(a.out, "w"), indent=1)
print(json.dumps({kk: out[kk] for kk in ("arch", "low", "ea", "eb", "set", "cpu_s", "test_map", "test_f1cal")})); print(out["per_class_f1"])
