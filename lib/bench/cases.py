"""What the benchmarks measure: the goals (fp16, end to end inside predict()) with the public figures beside them,
and the switch sets compared before and after (lib/engine/speed.py)."""

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 35mm"

# The goals (H100, fp16, batch 1 unless said, end to end inside predict()) and the public figures beside them.
GOALS = [
    {
        "name": "sd-turbo 512, 1 step, full VAE",
        "mode": "sd-turbo",
        "size": 512,
        "steps": 1,
        "batch": 1,
        "fast_decode": False,
        "goal_ms": 20,
        "anchor": "36 ms (A100, TensorRT)",
    },
    {
        "name": "sd-turbo 512, 1 step, TAESD",
        "mode": "sd-turbo",
        "size": 512,
        "steps": 1,
        "batch": 1,
        "fast_decode": True,
        "goal_ms": 8,
        "anchor": "9.4 ms (4090, StreamDiffusion)",
    },
    {
        "name": "sdxl-turbo 512, 1 step, full VAE",
        "mode": "sdxl-turbo",
        "size": 512,
        "steps": 1,
        "batch": 1,
        "fast_decode": False,
        "goal_ms": 35,
        "anchor": "207 ms (A100, Stability) / 45 ms (A100, TensorRT)",
    },
    {
        "name": "lcm 768, 4 steps",
        "mode": "lcm",
        "size": 768,
        "steps": 4,
        "batch": 1,
        "fast_decode": False,
        "goal_ms": 80,
        "anchor": "-",
    },
    {
        "name": "lcm-lora-sdxl 1024, 4 steps",
        "mode": "lcm-lora-sdxl",
        "size": 1024,
        "steps": 4,
        "batch": 1,
        "fast_decode": False,
        "goal_ms": 250,
        "anchor": "700 ms (4090, eager)",
    },
    {
        "name": "sdxl-lightning-4step 1024, 4 steps",
        "mode": "sdxl-lightning-4step",
        "size": 1024,
        "steps": 4,
        "batch": 1,
        "fast_decode": False,
        "goal_ms": 250,  # the same work as lcm-lora-sdxl's goal: 4 SDXL UNet steps without CFG, one VAE decode
        "anchor": "-",
    },
    {
        "name": "sd-turbo 512, TAESD, num_outputs 12",
        "mode": "sd-turbo",
        "size": 512,
        "steps": 1,
        "batch": 12,
        "fast_decode": True,
        "goal_images_per_s": 300,
        "anchor": "167 images/s (4090)",
    },
]

# Before/after: each variant is a set of SPEED_* switches (lib/engine/speed.py) over the plain path.
PLAIN = {"SPEED": "0"}
VARIANTS = {
    "plain-no-sdpa": {**PLAIN, "SPEED_SDPA": "0"},
    "plain": PLAIN,
    "+tf32+cudnn": {**PLAIN, "SPEED_TF32": "1", "SPEED_CUDNN_BENCHMARK": "1"},
    "+channels_last": {**PLAIN, "SPEED_TF32": "1", "SPEED_CUDNN_BENCHMARK": "1", "SPEED_CHANNELS_LAST": "1"},
    "+fuse_qkv": {
        **PLAIN,
        "SPEED_TF32": "1",
        "SPEED_CUDNN_BENCHMARK": "1",
        "SPEED_CHANNELS_LAST": "1",
        "SPEED_FUSE_QKV": "1",
    },
    "no-graphs": {"SPEED_CUDA_GRAPHS": "0"},  # the defaults without the CUDA graphs
    "default": {},  # the defaults: on CUDA all of the above, the bfloat16 SDXL VAE and the CUDA graphs
    "compile": {"SPEED_COMPILE": "unet,vae"},  # the defaults, compiled
}
