"""interop.py: diffusers checkpoints: the diffusers transformer computes our DiT, an export samples in
DiTPipeline as our DDIM does, the exported scheduler, and what DiTPipeline cannot hold is refused."""

import os
import types
import warnings

import pytest
import torch

import checkpoint
import cli
import interop
import sampling
import tiny_dit
import tiny_vae
import vae as vae_lib
from conftest import TINY, one_error_line
from conftest import assert_close_to_golden as assert_close  # rtol 1e-4, atol 1e-5 x magnitude
from diffusion import process_model_args, run_diffusion_args
from models import DiT

tiny_dit.register()


NULL = 1000  # DiTPipeline's null label: the exported DiT has 1000 classes


def write_objective_checkpoint(path, objective, num_classes=1000):
    """A train.py checkpoint of a tiny latent DiT (8x8 latents, 64 px) trained with `objective`: its
    model_args and diffusion_args as train.py records them (a flow model has no sigma channels)."""
    process = run_diffusion_args(types.SimpleNamespace(objective=objective))
    kwargs = dict(input_size=8, in_channels=4, num_classes=num_classes, **process_model_args(process))
    torch.save({"model": tiny_dit.random_state_dict(1, **kwargs), "ema": tiny_dit.random_state_dict(0, **kwargs),
                "opt": {}, "args": {"model": tiny_dit.TINY_MODEL, "image_size": 64, "vae": "ema"}, "train_steps": 10,
                "epoch": 1, "model_args": dict(tiny_dit.tiny(**kwargs).model_args), "diffusion_args": process}, path)
    return str(path)


@pytest.fixture(scope="module")
def v_ckpt(tmp_path_factory):
    return write_objective_checkpoint(tmp_path_factory.mktemp("v") / "v.pt", "v")


# ------------------------------------------------------------------ diffusers
def our_model(ckpt):
    loaded = checkpoint.load(ckpt)
    return checkpoint.build_model(loaded.model_args, loaded.state_dict).eval(), loaded


@torch.no_grad()
def test_diffusers_transformer_computes_our_dit_conditional_and_null_label(latent_ckpt):
    model, loaded = our_model(latent_ckpt)
    transformer = interop.to_diffusers_transformer(loaded.state_dict, loaded.model_args)
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 250, 500, 999, 999])
    y = torch.tensor([0, 3, 999, NULL, NULL, 7])
    ours = model(x, t, y)
    stock = transformer(x, timestep=t, class_labels=y).sample
    interop.use_original_timestep_frequencies(transformer)
    assert ours.abs().max() > 0.1 and ours[:, 4:].abs().max() > 0.1  # noise and sigma halves both non-trivial
    assert_close(transformer(x, timestep=t, class_labels=y).sample, ours)
    # diffusers' own timestep frequencies (10000**(-i/127)) agree at t = 0 only: the documented difference.
    assert_close(stock[0], ours[0])
    assert (stock[2:] - ours[2:]).abs().amax(dim=(1, 2, 3)).min() > 1e-2


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_export_samples_in_dit_pipeline_as_our_ddim_does_on_the_original(objective, request, tmp_path, vae_folder):
    """The same noise and DDIM steps with guidance: DiTPipeline (diffusers' scheduler and
    transformer) on the export against sampling.generate (our sampler and DiT) on the original
    checkpoint, latents and decoded images, within assert_close_to_golden's tolerance (rtol 1e-4,
    atol 1e-5 x magnitude). A v model's scheduler predicts v; loading the folder (or a
    .safetensors export) back gives the original process."""
    from diffusers import DDIMScheduler, DiTPipeline

    ckpt = request.getfixturevalue("latent_ckpt" if objective == "eps" else "v_ckpt")
    folder = checkpoint.export_diffusers(ckpt, tmp_path / "pipeline", vae_path=vae_folder)
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[objective]
    interop.use_original_timestep_frequencies(pipe.transformer)
    decoded_latents = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: decoded_latents.append(z) or decode(z, *a, **k)
    labels, steps, seed = [1, 500, 999], 10, 4
    images = pipe(labels, guidance_scale=4.0, num_inference_steps=steps, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images

    model, original = our_model(ckpt)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    sampler = sampling.make_sampler("ddim", steps, original.diffusion_args)
    latents, _ = sampling.generate(model, sampler, labels, 4.0, noise, guide_all_channels=True)
    assert latents.abs().max() > 0.5
    assert_close(decoded_latents[0] * pipe.vae.config.scaling_factor, latents)
    ours = vae_lib.decode(vae_lib.load_vae("ema", vae_folder), latents)
    assert_close(images, (ours / 2 + 0.5).clamp(0, 1))
    assert checkpoint.load(folder).diffusion_args == original.diffusion_args
    st = checkpoint.export_safetensors(ckpt, tmp_path / "dit.safetensors")
    assert checkpoint.load(st).diffusion_args == original.diffusion_args


def test_a_flow_model_is_refused_by_the_diffusers_export_and_kept_by_safetensors(tmp_path, vae_folder):
    flow = write_objective_checkpoint(tmp_path / "flow.pt", "flow")
    message = one_error_line(checkpoint.main, ["export", flow, str(tmp_path / "pipeline"), "--vae-path", vae_folder])
    assert "flow" in message and "DiTPipeline" in message and ".safetensors instead" in message
    assert os.listdir(tmp_path) == ["flow.pt"]
    checkpoint.main(["export", flow, str(tmp_path / "flow.safetensors")])
    assert checkpoint.load(str(tmp_path / "flow.safetensors")).diffusion_args == checkpoint.load(flow).diffusion_args


def test_an_export_with_other_than_1000_classes_prints_the_call_that_works(tmp_path, vae_folder, capsys):
    """DiTPipeline's null label is 1000: a 10-class DiT samples in it only without guidance. One
    line of ours on stderr (no Python warning) gives the call, and that call works."""
    from diffusers import DiTPipeline

    ckpt = write_objective_checkpoint(tmp_path / "ten.pt", "eps", num_classes=10)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = checkpoint.export_diffusers(ckpt, tmp_path / "pipeline", vae_path=vae_folder)
    notes = [line for line in capsys.readouterr().err.splitlines() if "null class" in line]
    assert len(notes) == 1 and notes[0].startswith("note:"), notes
    assert "10 classes" in notes[0] and "guidance_scale=1" in notes[0]
    assert not [w for w in caught if "null class" in str(w.message)]
    call = notes[0][notes[0].index("DiTPipeline.from_pretrained("):]
    assert call == f"DiTPipeline.from_pretrained({folder!r})(class_labels=[0], guidance_scale=1)"
    images = DiTPipeline.from_pretrained(folder)(class_labels=[0, 9], guidance_scale=1, num_inference_steps=2,
                                                 output_type="pt").images
    assert images.shape == (2, 3, 64, 64)


def test_diffusers_folder_loads_back_to_the_original_weights(pipeline_folder, latent_ckpt, vae_folder):
    original = checkpoint.load(latent_ckpt)
    for source in (pipeline_folder, os.path.join(pipeline_folder, "transformer")):
        again = checkpoint.load(source)
        assert set(again.state_dict) == set(original.state_dict)
        for name, value in original.state_dict.items():
            assert torch.equal(again.state_dict[name], value), (source, name)
        assert again.model_args == checkpoint.complete_model_args(original.model_args)
        assert again.diffusion_args == original.diffusion_args
    assert checkpoint.load(pipeline_folder).settings == {
        "model": tiny_dit.TINY_MODEL, "image_size": 64, "vae": "ema",
        "vae_path": os.path.join(pipeline_folder, "vae")}
    assert checkpoint.load(os.path.join(pipeline_folder, "transformer")).settings["vae_path"] is None


@pytest.mark.parametrize("diffusion_args", [
    {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True},
    {"noise_schedule": "linear", "diffusion_steps": 500, "learn_sigma": False},
    {"noise_schedule": "squaredcos_cap_v2", "diffusion_steps": 1000, "learn_sigma": True, "predict_xstart": True},
])
def test_the_exported_scheduler_has_our_betas_and_reads_back(diffusion_args):
    from diffusion import create_diffusion

    scheduler = interop.scheduler_for(diffusion_args)
    ours = torch.tensor(create_diffusion("", **diffusion_args).betas, dtype=torch.float32)
    torch.testing.assert_close(scheduler.betas, ours, rtol=1e-5, atol=1e-8)
    config = dict(scheduler.config)
    assert interop.diffusion_args_from_scheduler(config, diffusion_args["learn_sigma"], "x") == diffusion_args


def test_export_refuses_what_dit_pipeline_cannot_hold(tmp_path, pipeline_folder, latent_ckpt):
    pixel = tmp_path / "pixel.pt"
    tiny_dit.write_checkpoint(pixel, image_size=8, vae="none", in_channels=1)
    assert "pixel space" in one_error_line(checkpoint.export_diffusers, str(pixel), str(tmp_path / "p"))
    assert "not empty" in one_error_line(checkpoint.export_diffusers, latent_ckpt, pipeline_folder)
    (tmp_path / "plain").mkdir()
    assert "not a diffusers DiT" in one_error_line(checkpoint.load, str(tmp_path / "plain"))
    vae_only = tiny_vae.save_tiny_vae(tmp_path / "vae_only")  # a diffusers folder, but not a DiT
    assert "not a DiT transformer" in one_error_line(checkpoint.load, vae_only)


def test_a_diffusers_dit_with_its_own_embedders_per_block_is_refused(tmp_path, pipeline_folder):
    """Trained in diffusers, each block's timestep/class embedder drifts apart; DiT has one."""
    from diffusers import DiTTransformer2DModel

    transformer = DiTTransformer2DModel.from_pretrained(pipeline_folder, subfolder="transformer")
    with torch.no_grad():
        transformer.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(0.01)
    transformer.save_pretrained(tmp_path / "drifted")
    assert "block 1 has its own" in one_error_line(checkpoint.load, str(tmp_path / "drifted"))


def test_a_failed_export_leaves_no_folder(tmp_path, latent_ckpt, vae_folder, monkeypatch):
    from diffusers import DiTPipeline

    def fail(self, folder, **kwargs):
        open(os.path.join(folder, "model_index.json"), "w").close()  # half-written
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(DiTPipeline, "save_pretrained", fail)
    with pytest.raises(OSError):
        checkpoint.export_diffusers(latent_ckpt, tmp_path / "out", vae_path=vae_folder)
    assert os.listdir(tmp_path) == []


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("option", [dict(pos="rope"), dict(qk_norm=True), dict(mlp="swiglu"), dict(norm="rmsnorm"),
                                    dict(input_size=[8, 16])])
def test_diffusers_export_refuses_what_dit_transformer_cannot_hold(option):
    model_args = checkpoint.complete_model_args({**DiT(**TINY, input_size=8).model_args, **option})
    with pytest.raises(cli.UserError, match="export it as .safetensors instead"):
        interop.diffusers_config(model_args)
