"""Train the embedded model (seg_core.embedded) from scratch on the coloured-shapes set, and its judge.

    OMP_NUM_THREADS=1 python scripts/train_embedded.py            # all stages, seeded, ~45 min on 1 CPU core

Stages (each seeds itself, so running them one by one gives the same weights as running them together):
  vae         a small AutoencoderKL (factor 2, 4 latent channels): L2 + L1 reconstruction and a tiny KL;
              its scaling_factor is set to 1 / std of the training latents.
  unet        an SDXL-structured UNet2DConditionModel (text_time conditioning, self-attention in the mid
              block): epsilon-prediction DDPM loss on the pipeline scheduler's noise schedule, 10% of the
              captions dropped (half to the encoded "", half to zeros, which is what the pipeline feeds
              the unconditional branch when no negative prompt is given); EMA weights are saved.
  classifier  seg_core.shapes.ShapeClassifier on held-out images (another seed), for scripts/evaluate.py.
Then the whole pipeline is saved with save_pretrained (safetensors, fp16 weights) to assets/embedded,
with the training log and a plot of the loss curves.  A GPU is used when one is available.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from seg_core import shapes  # noqa: E402
from seg_core.embedded import ASSETS_DIR, build_components  # noqa: E402
from seg_core.pipeline import StableDiffusionXLSEGPipeline  # noqa: E402

TRAIN_SEED, CLASSIFIER_SEED = 1, 2  # data seeds; scripts/evaluate.py draws its reference set with seed 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ASSETS_DIR / "embedded"), help="folder of the saved pipeline")
    p.add_argument("--classifier-out", default=str(ASSETS_DIR / "embedded_classifier.safetensors"))
    p.add_argument("--stages", default="vae,unet,classifier", help="comma-separated subset of vae,unet,classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=24000)
    p.add_argument("--vae-steps", type=int, default=500)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--unet-steps", type=int, default=1200)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=8e-4)
    p.add_argument("--resume", action="store_true",
                   help="unet stage: start from the UNet saved in --out (its EMA weights) and append to its log")
    p.add_argument("--classifier-steps", type=int, default=800)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p.parse_args(argv)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 2% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, images: torch.Tensor, args, device, log: dict):
    gen = seed_everything(args.seed + 10)
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for step in (bar := tqdm(range(args.vae_steps), desc="vae", mininterval=5)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, 1e-3)
        x = images[torch.randint(len(images), (args.vae_batch,), generator=gen)].to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = rec + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(rec.item())
        bar.set_postfix(rec=f"{np.mean(losses[-20:]):.4f}", refresh=False)
    log["vae"] = losses
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device, batch: int = 256):
    """Posterior means and standard deviations of every training image."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encode", mininterval=5):
        dist = vae.encode(images[i:i + batch].to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def caption_embeddings(pipe: StableDiffusionXLSEGPipeline, device):
    """prompt_embeds and pooled embeddings of every caption, then of "", then zeros (no negative prompt)."""
    texts = list(shapes.CAPTIONS) + [""]
    embeds, _, pooled, _ = pipe.encode_prompt(texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    embeds = torch.cat([embeds, torch.zeros_like(embeds[:1])])
    pooled = torch.cat([pooled, torch.zeros_like(pooled[:1])])
    return embeds, pooled


def train_unet(pipe, latents_mean, latents_std, label_ids, args, device, log: dict):
    gen = seed_everything(args.seed + 20)
    unet, scheduler = pipe.unet, pipe.scheduler
    embeds, pooled = caption_embeddings(pipe, device)
    empty, zeros = len(shapes.CAPTIONS), len(shapes.CAPTIONS) + 1
    # the pipeline's time_ids at the trained size: original size, crop top-left, target size
    time_ids = torch.tensor([[shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 0, 0, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE]],
                            dtype=torch.float32, device=device)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    scaling = pipe.vae.config.scaling_factor

    unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.01)
    losses = []
    for step in (bar := tqdm(range(args.unet_steps), desc="unet", mininterval=5)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.unet_lr, warmup=100)
        idx = torch.randint(len(latents_mean), (args.unet_batch,), generator=gen)
        z = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=gen)
        x0 = (z * scaling).to(device)
        caption = label_ids[idx].clone()
        drop = torch.rand(len(idx), generator=gen)
        caption[drop < 0.1] = empty
        caption[drop < 0.05] = zeros
        caption = caption.to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, encoder_hidden_states=embeds[caption],
                    added_cond_kwargs={"text_embeds": pooled[caption], "time_ids": time_ids.expand(len(idx), -1)}).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    log["unet"] = losses
    return ema


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur and tint shifts, so that the classifier also reads imperfect generated images."""
    n = len(x)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    use_blur = (torch.rand(n, 1, 1, 1, generator=gen) < 0.3).float()
    x = use_blur * blur + (1 - use_blur) * x
    x = x + 0.08 * torch.randn(n, 3, 1, 1, generator=gen)
    x = x + torch.rand(n, 1, 1, 1, generator=gen) * 0.15 * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def train_classifier(args, device, log: dict):
    from safetensors.torch import save_file

    images, labels = shapes.sample(12000, seed=CLASSIFIER_SEED)
    x_all, y_all = shapes.to_tensor(images), shapes.label_indices(labels)
    gen = seed_everything(args.seed + 30)
    model = shapes.ShapeClassifier().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    losses = []
    for step in (bar := tqdm(range(args.classifier_steps), desc="classifier", mininterval=5)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.classifier_steps, 2e-3, warmup=20)
        idx = torch.randint(len(x_all), (128,), generator=gen)
        x, y = augment(x_all[idx], gen).to(device), y_all[idx].to(device)
        loss = sum(F.cross_entropy(logits, y[:, k]) for k, logits in enumerate(model(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
    model.eval()
    # accuracy on the training set's images (never seen by the classifier)
    test_images, test_labels = shapes.sample(1000, seed=TRAIN_SEED)
    accuracy = np.mean([p == t for p, t in zip(model.cpu().predict(test_images), test_labels)])
    print(f"classifier: all three attributes right on {accuracy:.1%} of 1000 real images")
    log["classifier"] = losses
    log["classifier_accuracy_real"] = float(accuracy)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.classifier_out)


def plot_curves(log: dict, path: Path) -> None:
    """Loss curves (raw and smoothed, log scale) with PIL, one panel per stage."""
    panels = [(k, log[k]) for k in ("vae", "unet", "classifier") if log.get(k)]
    w, h, pad = 420, 300, 48
    canvas = Image.new("RGB", (w * len(panels), h), "white")
    pen = ImageDraw.Draw(canvas)
    for p, (name, values) in enumerate(panels):
        values = np.log10(np.maximum(np.asarray(values), 1e-8))
        k = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        lo, hi = values.min(), values.max()
        x0, y0, x1, y1 = p * w + pad, pad // 2, (p + 1) * w - 12, h - pad

        def xy(i, v, n):
            return x0 + (x1 - x0) * i / max(1, n - 1), y1 - (y1 - y0) * (v - lo) / max(1e-8, hi - lo)

        pen.rectangle([x0, y0, x1, y1], outline="black")
        if name == "unet" and log.get("unet_resumed_at"):  # a second run (--resume) started here
            x = xy(log["unet_resumed_at"], lo, len(values))[0]
            pen.line([(x, y0), (x, y1)], fill=(220, 80, 40))
            pen.text((x + 4, y1 - 14), "--resume", fill=(220, 80, 40))
        pen.line([xy(i, v, len(values)) for i, v in enumerate(values)], fill=(190, 200, 230))
        pen.line([xy(i + k // 2, v, len(values)) for i, v in enumerate(smooth)], fill=(20, 60, 200), width=2)
        label = {"vae": "VAE reconstruction loss", "unet": "UNet eps-MSE loss", "classifier": "classifier CE loss"}[name]
        pen.text((x0 + 60, y0 + 4), f"{label} (log scale)", fill="black")
        pen.text((x0 - 40, y0), f"{10 ** hi:.3g}", fill="black")
        pen.text((x0 - 40, y1 - 10), f"{10 ** lo:.3g}", fill="black")
        pen.text((x0, y1 + 6), "0", fill="black")
        pen.text((x1 - 40, y1 + 6), f"{len(values)} steps", fill="black")
    canvas.save(path)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stages = set(args.stages.split(","))
    if not stages <= {"vae", "unet", "classifier"}:
        raise SystemExit(f"--stages must be a subset of vae,unet,classifier, got {args.stages!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training_log.json"
    log = {"commands": {args.stages: "python scripts/train_embedded.py " + " ".join(argv if argv is not None else sys.argv[1:])}}
    started = time.time()

    if stages & {"vae", "unet"}:
        components = build_components(seed=args.seed)
        images = shapes.to_tensor(shapes.sample(args.train_images, seed=TRAIN_SEED)[0])
        vae_dir = out / "vae"
        if "vae" in stages:
            # saved in fp16 as shipped, and reloaded, so that the UNet trains on the shipped VAE's latents
            vae = train_vae(components["vae"], images, args, device, log)
            vae.to("cpu", dtype=torch.float16).save_pretrained(vae_dir, safe_serialization=True)
        vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).to(device).eval()
        mean, std = encode_latents(vae, images, device)
        sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(args.seed))
        vae.register_to_config(scaling_factor=float(1 / sampled.std()))
        print(f"vae: latent channel means {sampled.mean((0, 2, 3)).tolist()}, std {sampled.std().item():.3f}; "
              f"scaling_factor {vae.config.scaling_factor:.4f}")
        with torch.no_grad():
            recon = vae.decode(mean[:512].to(device)).sample.cpu()
        log["vae_recon_mse"] = float(F.mse_loss(recon, images[:512]))
        print(f"vae: reconstruction MSE on [-1, 1] images {log['vae_recon_mse']:.5f}")
        components["vae"] = vae
        if "unet" in stages:
            if args.resume:
                from diffusers import UNet2DConditionModel

                components["unet"] = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float32)
                previous = json.loads(log_path.read_text()).get("unet", [])
            pipe = StableDiffusionXLSEGPipeline(**components, add_watermarker=False)
            labels = shapes.sample(args.train_images, seed=TRAIN_SEED)[1]
            label_ids = torch.tensor([shapes.LABELS.index(label) for label in labels])
            pipe.unet = train_unet(pipe, mean, std, label_ids, args, device, log)
            if args.resume:
                log["unet_resumed_at"] = len(previous)
                log["unet"] = previous + log["unet"]
            pipe.register_modules(unet=pipe.unet)
            pipe.to("cpu", dtype=torch.float16).save_pretrained(out, safe_serialization=True)
        else:
            vae.to("cpu", dtype=torch.float16).save_pretrained(vae_dir, safe_serialization=True)  # with its scale
    if "classifier" in stages:
        train_classifier(args, device, log)

    # stages may run as separate processes: merge with what the others logged meanwhile
    saved = json.loads(log_path.read_text()) if log_path.exists() else {}
    seconds = {**saved.get("seconds", {}), args.stages: round(time.time() - started, 1)}
    log = {**saved, **log, "seconds": seconds, "commands": {**saved.get("commands", {}), **log["commands"]}}
    log_path.write_text(json.dumps(log))
    plot_curves(log, out / "training_curve.png")
    print(f"done in {time.time() - started:.0f} s: {out}")


if __name__ == "__main__":
    main()
