"""A user's own env from the command line: --env module:attr and --env-module, with clear errors."""

from __future__ import annotations

import json
import sys
import textwrap

import gymnasium as gym
import pytest

from palate.cli import main
from palate.rl import PPO, PPOConfig

MODULE = "palate_test_userenvs"
SOURCE = textwrap.dedent('''
    import gymnasium as gym
    import numpy as np

    class Walk(gym.Env):
        """Walk right (action 1) for reward; 20 steps an episode; renders small RGB frames."""
        metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

        def __init__(self, render_mode=None):
            self.render_mode = render_mode
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
            self.action_space = gym.spaces.Discrete(2)
            self.t = 0

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return np.zeros(2, np.float32), {}

        def step(self, action):
            self.t += 1
            return np.array([self.t / 20, action], np.float32), float(action), False, self.t >= 20, {}

        def render(self):
            return np.full((16, 16, 3), 10 * self.t, np.uint8)

    class NoRenderArg(Walk):
        def __init__(self):  # an entry point without render_mode
            super().__init__()

    def make_walk():
        return Walk()

    NOT_AN_ENV = 3
    gym.register("UserWalk-v0", entry_point=__name__ + ":Walk")
    gym.register("UserNoRenderArg-v0", entry_point=__name__ + ":NoRenderArg")
''')
IDS = ("UserWalk-v0", "UserNoRenderArg-v0")
SMALL = ["--total-steps", "64", "--n-envs", "2", "--n-steps", "32", "--batch-size", "32", "--n-epochs", "1",
         "--no-progress"]


def forget_module() -> None:
    sys.modules.pop(MODULE, None)
    for env_id in IDS:
        gym.envs.registry.pop(env_id, None)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The module above, importable but not imported (so its ids are not registered yet)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(src))
    forget_module()
    yield MODULE
    forget_module()


def train(tmp_path, *args: str) -> int:
    return main(["rl", "train", *args, *SMALL, "--runs-dir", str(tmp_path / "runs"), "--run-name", "u"])


def test_env_class_by_module_attr_trains_evaluates_films_and_resumes(tmp_path, user_module):
    assert train(tmp_path, "--env", f"{user_module}:Walk") == 0
    run = tmp_path / "runs" / "u"
    assert f"env: {user_module}:Walk" in (run / "config.yaml").read_text()
    assert main(["rl", "eval", str(run), "--episodes", "1", "--video"]) == 0
    assert json.loads((run / "eval.json").read_text())["mean_length"] == 20
    assert any((run / "videos").iterdir())  # rendered through Walk(render_mode="rgb_array")
    assert main(["rl", "resume", str(run), "--total-steps", "128", "--no-progress"]) == 0


def test_env_module_registers_ids_for_train_eval_and_resume(tmp_path, user_module):
    assert "UserWalk-v0" not in gym.envs.registry
    assert train(tmp_path, "--env", "UserWalk-v0", "--env-module", user_module) == 0
    run = tmp_path / "runs" / "u"
    forget_module()  # eval and resume import it again from config.yaml's env_module
    assert main(["rl", "eval", str(run), "--episodes", "1", "--video"]) == 0  # entry point given render_mode
    forget_module()
    assert main(["rl", "resume", str(run), "--total-steps", "128", "--no-progress"]) == 0


def test_gymnasium_module_id_form_and_an_entry_point_without_render_mode(tmp_path, user_module):
    assert train(tmp_path, "--env", f"{user_module}:UserNoRenderArg-v0") == 0


def test_factory_through_the_api(user_module):
    model = PPO(PPOConfig(env=f"{user_module}:make_walk", n_envs=2, n_steps=32, batch_size=32, n_epochs=1,
                          total_steps=64)).learn(progress=False)
    assert model.global_step == 64 and model.episodes == 2


@pytest.mark.parametrize("args,message", [
    (["--env", "palate_no_such_module:Env"], "no module named 'palate_no_such_module'"),
    (["--env", f"{MODULE}:Wlak"], f"did you mean {MODULE}:Walk"),
    (["--env", f"{MODULE}:NOT_AN_ENV"], "not an env class or factory"),
    (["--env", "UserWalk-v0", "--env-module", "palate_no_such_module"], "--env-module palate_no_such_module"),
    (["--env", "UserWalk-v0"], "--env-module"),  # an id the user's module would register
])
def test_user_env_mistakes_name_the_input_and_the_fix(tmp_path, capsys, user_module, args, message):
    assert train(tmp_path, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()
