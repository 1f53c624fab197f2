"""The ablation's configurations: train.py flags relative to the defaults, shared by lab.ablate and lab.confirm."""
from sac_model import PRESETS, flag


def preset_flags(name: str) -> list[str]:
    """A PRESETS entry as train.py flags (a study resumes its runs with their flags, and --resume takes no
    --preset)."""
    return [part for field, value in PRESETS[name].items() for part in (flag(field), str(value))]


# Each component switched the other way on its own; "full" is the method as the repository ships it (with
# uniform replay and a constant learning rate: PER and StepLR are what a user can turn on).
CONFIGS = {
    "full": [],
    "with_per": ["--buffer", "prioritized"],
    "with_lr_schedule": ["--lr-gamma", "0.872"],  # the search's StepLR factor, every 100 episodes
    "no_n_step": ["--n-step", "1"],
    "no_layer_norm": ["--no-layer-norm"],
    "no_grad_clip": ["--grad-clip", "0"],
}
# Other ways to run the same method, compared only when --configs names them (never part of the default study).
VARIANTS = {
    "bf16": ["--precision", "bf16"],  # bf16 matrix products: does the speed cost learning?
    "obs_norm": ["--obs-norm"],  # observations standardised by their running statistics (docs/critics.md)
    # The default before the run stopped at 260: the first check that clears the env's solved threshold.
    "stop_at_200": ["--target-return", "auto"],
    # The critic kinds of docs/critics.md's pilots, each with the flags it ran with.
    "tqc": ["--critic", "tqc"],  # 2 critics x 25 quantiles, 2 dropped per critic: sb3-contrib's and rl-zoo3's
    # CrossQ's paper's optimizer settings beside its critics; the rest (n-step 3, batch 256, width 256) ours.
    "crossq": preset_flags("crossq"),
    # The batch size / update-to-data / width trade, judged in wall time to the landed lander (docs/critics.md):
    # a cheaper gradient step that needs more env steps can still land sooner, a dearer one must need fewer.
    "width_128": ["--hidden-size", "128"],
    "width_192": ["--hidden-size", "192"],
    "batch_128": ["--batch-size", "128"],
    "batch_512": ["--batch-size", "512"],
    "utd_2": ["--updates-per-step", "2"],
}
