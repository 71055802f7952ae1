import keras
import tensorflow as tf


def _cbr(x, f, k, s, name):
    x = keras.layers.Conv2D(f, k, strides=s, padding="same", use_bias=False, name=name + "_conv")(x)
    x = keras.layers.BatchNormalization(name=name + "_bn")(x)
    return keras.layers.ReLU(name=name + "_relu")(x)


def s2cnn(input_shape, width, stem=None, blocks=4):
    """strided stem, then simple_cnn's VGG blocks"""
    inputs = keras.Input(shape=input_shape, name="backbone_input")
    x = _cbr(inputs, stem or 2 * width, 3, 2, "stem")
    for i, f in enumerate([width * 2 ** b for b in range(blocks)], 1):
        for j in (1, 2):
            x = _cbr(x, f, 3, 1, f"block{i}_{j}")
        x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    return keras.Model(inputs, x, name="backbone")


@keras.saving.register_keras_serializable("scratch")
class S2D(keras.layers.Layer):
    def call(self, x):
        return tf.nn.space_to_depth(x, 2)

    def compute_output_shape(self, s):
        return (s[0], s[1] // 2, s[2] // 2, s[3] * 4)


def s2dcnn(input_shape, width):
    inputs = keras.Input(shape=input_shape, name="backbone_input")
    x = S2D(name="s2d")(inputs)
    for i, f in enumerate((width, 2 * width, 4 * width, 8 * width), 1):
        for j in (1, 2):
            x = _cbr(x, f, 3, 1, f"block{i}_{j}")
        x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    return keras.Model(inputs, x, name="backbone")


def rn_s2(input_shape, width, strides=(1, 2, 2, 2), blocks=(1, 1, 1, 1)):
    from mlic.model import _basic_block
    inputs = keras.Input(shape=input_shape, name="backbone_input")
    x = _cbr(inputs, width, 3, 2, "stem")
    for i, (n, f, s) in enumerate(zip(blocks, (width, 2 * width, 4 * width, 8 * width), strides), 1):
        for j in range(n):
            x = _basic_block(x, f, s if j == 0 else 1, name=f"stage{i}_block{j + 1}")
    return keras.Model(inputs, x, name="backbone")


def register(M):
    spec = M.BackboneSpec
    M.BACKBONES["s2cnn"] = spec(s2cnn, "unit", from_scratch=True)
    M.BACKBONES["s2cnn_s32"] = spec(lambda s, w: s2cnn(s, w, stem=32), "unit", from_scratch=True)
    M.BACKBONES["s2dcnn"] = spec(s2dcnn, "unit", from_scratch=True)
    M.BACKBONES["rn_s2"] = spec(rn_s2, "unit", from_scratch=True)
    M.BACKBONES["rn_s2_2222"] = spec(lambda s, w: rn_s2(s, w, blocks=(2, 2, 2, 2)), "unit", from_scratch=True)


def build(name, k, size, cfg):
    raise ValueError(name)
