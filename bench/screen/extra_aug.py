import tensorflow as tf

PERMS = tf.constant([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def colour(x, y):
    n = tf.shape(x)[0]
    perm = tf.gather(PERMS, tf.random.uniform([n], 0, 6, tf.int32))  # (n,3)
    x = tf.gather(x, perm, axis=3, batch_dims=1)
    gray = tf.reduce_mean(x, axis=3, keepdims=True)
    g = tf.random.uniform([n, 1, 1, 1]) < 0.2
    x = tf.where(g, tf.repeat(gray, 3, axis=3), x)
    inv = tf.random.uniform([n, 1, 1, 1]) < 0.2
    x = tf.where(inv, 255.0 - x, x)
    return x, y


def mixup(x, y, alpha=0.4):
    n = tf.shape(x)[0]
    g1 = tf.random.gamma([n], alpha); g2 = tf.random.gamma([n], alpha)
    lam = g1 / (g1 + g2)
    lam = tf.maximum(lam, 1 - lam)  # the first image dominates
    idx = tf.random.shuffle(tf.range(n))
    x2, y2 = tf.gather(x, idx), tf.gather(y, idx)
    l4 = lam[:, None, None, None]
    return l4 * x + (1 - l4) * x2, lam[:, None] * y + (1 - lam[:, None]) * y2


def wrap(make, extra):
    if not extra:
        return make
    def made(**kw):
        ds = make(**kw)
        if "colour" in extra:
            ds = ds.map(colour)
        if "mixup" in extra:
            ds = ds.map(mixup)
        return ds
    return made
