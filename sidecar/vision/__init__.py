"""Vision-language models through mlx-vlm (the optional extra localmlx[vision]): images in
messages (images), which checkpoints see (detect), a loaded model's processor and prompts
(model), and one generation's steps on the engine thread (run)."""
