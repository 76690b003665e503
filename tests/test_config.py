"""jem_tf.run.config: TrainConfig, its validation, and the recipes installed as jem_tf.recipes."""

import configparser
import json
import os
import subprocess
import sys

import pytest
from conftest import make_folder

import jem_tf
from jem_tf.errors import UsageError
from jem_tf.run import config as config_lib
from jem_tf.run.config import TrainConfig


def test_bundled_recipes_are_valid():
    assert set(config_lib.available_recipes()) >= {"digits", "fashion_mnist", "cifar10_wrn28_10"}
    cifar = config_lib.load_recipe("cifar10_wrn28_10")
    assert (cifar.backbone, cifar.normalization, cifar.learning_rate, cifar.warmup_steps, cifar.batch_size) == \
        ("wrn-28-10", "none", 1e-4, 1000, 64)
    assert (cifar.sgld_steps, cifar.sgld_step_size, cifar.sgld_noise_std, cifar.buffer_size) == (20, 1.0, 0.01, 10000)
    assert (cifar.restart_prob, cifar.data_noise_std, cifar.augment) == (0.05, 0.03, "crop_flip")


def test_fast_recipes_are_jem_plus_plus_and_the_paper_recipe_is_kept():
    fast = config_lib.load_recipe("fashion_mnist")
    assert (fast.chain_init, fast.sgld_steps, fast.sgld_grad_clamp, fast.sgld_noise_std, fast.sgld_clamp) == \
        ("class_gaussian", 5, 1.0, 0.0, True)
    assert fast.precision == "auto" and fast.energy_l2_weight > 0
    paper = config_lib.load_recipe("fashion_mnist_jem_paper")
    assert (paper.chain_init, paper.sgld_steps, paper.sgld_step_size, paper.sgld_noise_std) == \
        ("uniform", 20, 1.0, 0.01)
    assert (paper.learning_rate, paper.warmup_steps, paper.restart_prob, paper.sgld_grad_clamp) == \
        (1e-4, 1000, 0.05, None)


def test_finetune_recipes_need_a_classifier_and_keep_their_datasets_sampler():
    for name, base in (("digits_finetune", "digits"), ("fashion_mnist_finetune", "fashion_mnist")):
        recipe, original = config_lib.load_recipe(name), config_lib.load_recipe(base)  # a recipe alone loads
        assert recipe.finetune and recipe.init_from is None and recipe.dataset == original.dataset
        assert (recipe.chain_init, recipe.sgld_steps > 0, recipe.sgld_grad_clamp) == ("class_gaussian", True, 1.0)
        with pytest.raises(ValueError, match="init_from must be the trained classifier this fine-tuning recipe"):
            recipe.validate()  # complete: a command line must give --init-from
        assert recipe.replace(init_from="runs/x").validate().init_from == "runs/x"


@pytest.mark.parametrize("overrides, message", [
    ({"init_from": " "}, "init_from must be a path to a .keras file or a training work directory, or none"),
    ({"init_from_sha256": "ab" * 32}, "init_from_sha256 must be none, or the 64 lowercase hex digits"),
    ({"init_from": "x.keras", "init_from_sha256": "AB" * 32}, "init_from_sha256 must be none, or the 64"),
    ({"chain_init_uniform_fraction": 0.5},
     "chain_init_uniform_fraction must be 0 unless chain_init is 'class_gaussian'"),
    ({"chain_init": "class_gaussian", "chain_init_uniform_fraction": 1.5}, "chain_init_uniform_fraction must be in"),
    ({"chain_init_flat_fraction": -0.1}, r"chain_init_flat_fraction must be in \[0, 1 - chain_init_uniform_fraction\]"),
    ({"chain_init": "class_gaussian", "chain_init_uniform_fraction": 0.5, "chain_init_flat_fraction": 0.6},
     "chain_init_flat_fraction must be in"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
    ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 1\)"),
])
def test_conversion_and_start_fields_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig().replace(**overrides).validate()


def test_recipes_are_the_installed_jem_tf_recipes_package():
    # The recipes live in the repository's trainers/ folder and are installed under jem_tf's own name, so
    # the library imports them like any of its modules (no top-level `trainers` package).
    from jem_tf import recipes

    repo_trainers = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(jem_tf.__file__))), "trainers")
    assert os.path.samefile(config_lib.recipes_dir(), os.path.dirname(recipes.__file__))
    if os.path.isdir(repo_trainers):  # editable install: the folder itself
        assert os.path.samefile(config_lib.recipes_dir(), repo_trainers)
    assert {f[:-5] for f in os.listdir(config_lib.recipes_dir()) if f.endswith(".json")} == \
        set(config_lib.available_recipes())


def test_setup_cfg_lists_every_package_of_the_source_tree():
    root = os.path.dirname(os.path.dirname(os.path.abspath(jem_tf.__file__)))
    setup_cfg = os.path.join(root, "setup.cfg")
    if not os.path.isfile(setup_cfg):
        pytest.skip("not a source checkout")
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    listed = set(parser["options"]["packages"].split())
    on_disk = {os.path.relpath(d, root).replace(os.sep, ".")
               for d, _, files in os.walk(os.path.join(root, "jem_tf")) if "__init__.py" in files}
    assert listed == on_disk | {"jem_tf.recipes"}
    assert parser["options"]["package_dir"].split() == ["jem_tf.recipes", "=", "trainers"]


def test_load_recipe_from_a_path_and_unknown_fields(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"epochs": 2, "sgld_steps": 7}))
    config = config_lib.load_recipe(str(path))
    assert (config.epochs, config.sgld_steps, config.batch_size) == (2, 7, TrainConfig().batch_size)
    path.write_text(json.dumps({"epochs": 2, "sgld_stepz": 7}))
    with pytest.raises(ValueError, match="sgld_stepz"):
        config_lib.load_recipe(str(path))
    with pytest.raises(ValueError, match="Unknown recipe 'nope'"):
        config_lib.load_recipe("nope")
    path.write_text('{"epochs": 2, "sgld_steps": 7, "epochs": 30}')  # json.loads would keep 30 silently
    with pytest.raises(ValueError, match="sets 'epochs' more than once"):
        config_lib.load_recipe(str(path))


@pytest.mark.integration
@pytest.mark.parametrize("overrides, field", [
    ({"epochs": 0}, "epochs"), ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"dataset": "imagenet"}, "dataset"), ({"backbone": "wrn-27-2"}, "backbone"),
    ({"precision": "auto", "strategy": "multi_worker"}, "precision"),
    ({"classifier_epochs": 5, "epochs": 5}, "classifier_epochs"),
    ({"decay_epochs": [5, 3]}, "decay_epochs"), ({"restart_prob": 1.5}, "restart_prob"),
    ({"stem_init": "pca"}, "stem_init"), ({"stem_init": "whitened"}, "stem_init"),  # the default small_cnn has none
    ({"density_head": -1}, "density_head"), ({"density_head": 8}, "density_head"),  # no init_from
    ({"density_head": 8, "init_from": "run", "px_weight": 0.0}, "density_head"),
    ({"density_head_finetune": True, "init_from": "run"}, "density_head_finetune"),  # no density head
    ({"density_head_layers": ["stem_act"], "init_from": "run"}, "density_head_layers"),  # no density head
    ({"density_head": 8, "init_from": "run", "density_head_layers": ["a", "a"]}, "density_head_layers"),
    ({"density_head_offset": "nonpositive", "init_from": "run"}, "density_head_offset"),  # no density head
    ({"density_head": 8, "init_from": "run", "density_head_offset": "positive"}, "density_head_offset"),
    ({"temperature_scaling": True, "init_from": "run", "validation_fraction": 0.0}, "temperature_scaling"),
    ({"density_temperature": 2.0, "init_from": "run"}, "density_temperature"),  # no density head
    ({"density_head": 8, "init_from": "run", "density_head_finetune": True, "density_temperature": 2.0},
     "density_temperature"),  # the classifier trains
    ({"density_head": 8, "init_from": "run", "density_temperature": 0.0}, "density_temperature"),
    ({"density_head": 8, "init_from": "run", "density_temperature": float("inf")}, "density_temperature"),
    ({"test_time_augmentation": "rotate"}, "test_time_augmentation"),
])
def test_validate_names_the_bad_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig().replace(**overrides).validate()


def test_round_trip_through_a_dict():
    config = config_lib.load_recipe("fashion_mnist")
    assert TrainConfig().replace(**json.loads(json.dumps(config.to_dict()))) == config


def test_importing_the_config_imports_no_tensorflow():
    # jem_tf/__init__.py imports the JEM (TensorFlow) for the package's public names; the config modules
    # themselves must not, so the package is bound without running its __init__ here.
    package_dir = os.path.dirname(os.path.abspath(jem_tf.__file__))
    script = ("import sys, types\n"
              f"package = types.ModuleType('jem_tf'); package.__path__ = [{package_dir!r}]\n"
              "sys.modules['jem_tf'] = package\n"
              "from jem_tf.run.config import TrainConfig, field_types\n"
              "config = TrainConfig().replace(epochs=2)\n"
              "assert config.to_dict()['epochs'] == 2 and 'dataset' in field_types()\n"
              "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'numpy'))\n"
              "print('heavy:', heavy[:5])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "heavy: []"


def test_validation_errors_are_usage_errors_and_value_errors():
    with pytest.raises(UsageError, match="sgld_steps must be an integer >= 1; received 0") as error:
        TrainConfig(sgld_steps=0).validate()
    assert isinstance(error.value, ValueError)
    with pytest.raises(UsageError, match="Unknown config field"):
        TrainConfig().replace(sgld_stepz=1)
    # Types are checked before any other rule: a string where an int belongs is never compared with a number.
    with pytest.raises(UsageError, match="epochs must be an integer; received '3'"):
        TrainConfig(epochs="3", classifier_epochs=5).validate()


def test_cifar10_recipes_validate_on_an_image_folder(tmp_path, cache_dir):
    from jem_tf.run.config import load_recipe

    root = make_folder(tmp_path / "data", size=(32, 32))
    recipe = load_recipe("cifar10").replace(dataset=root)
    assert recipe.validate().backbone == "fast_cnn" and recipe.augment == "crop_flip"
    finetune = load_recipe("cifar10_finetune").replace(dataset=root, init_from="runs/cifar10_classifier")
    assert finetune.validate().finetune
    with pytest.raises(UsageError, match="init_from must be"):
        load_recipe("cifar10_finetune").replace(dataset=root).validate()
    assert load_recipe("cifar10_wrn28_10").replace(dataset=root).validate().backbone == "wrn-28-10"
    with pytest.raises(UsageError, match="image_size must be none unless the dataset is an image folder"):
        load_recipe("cifar10").replace(image_size=[16, 16]).validate()
