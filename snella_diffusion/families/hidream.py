"""HiDream-I1 (``HiDreamImagePipeline``), as diffusers' ``train_dreambooth_lora_hidream.py``
trains it.

- Prompts through four encoders, each as the pipeline encodes them, ``--max_sequence_length``
  tokens (default 128): the projected pooled outputs of the two CLIP encoders (``text_encoder``,
  ``text_encoder_2``; at most 218 tokens, no mask) concatenated (``pooled_prompt_embeds``), T5's
  last hidden state with its attention mask (``prompt_embeds_t5``; at most the T5 tokenizer's
  length) and every hidden layer of the Llama-3.1 encoder after the embeddings
  (``prompt_embeds_llama3``, Llama padded with its end-of-text token). The pipeline stacks the
  Llama layers first, ``(layers, B, L, D)``; they are kept batch-first ``(B, layers, L, D)``
  here (the training script repeats and concatenates conditioning along dim 0) and swapped
  back for the transformer and for the pipeline.
- The transformer is switched to its inference code path (``force_inference_output``, as the
  example loads it): outputs ``(B, C, H, W)`` in training mode too, and the mixture-of-experts
  gates route as at inference (no auxiliary balancing loss).
- The Llama encoder: published HiDream folders leave ``text_encoder_4`` / ``tokenizer_4`` out
  (Llama's licence); they are then loaded from :data:`LLAMA_SOURCE`, the example's default
  (``--pretrained_text_encoder_4_name_or_path``), with hidden states returned.
- Latents: the Flux VAE's ``(z - shift_factor)·scaling_factor`` of a sample, unpacked (the
  transformer patchifies 2×2 itself, padding non-square images).
- Model call: ``timesteps = σ·1000``; the velocity ``ε - x0`` is the negated output (the
  pipeline and the example negate it).
- σ sampling: the example loads its scheduler with ``shift=3.0`` whatever the published value:
  ``--weighting_scheme`` (default none) over the training table shifted by 3 (unshifted for a
  scheduler with dynamic shifting, which ignores ``shift`` at training time).
- Text-encoder training is not offered (nor is it by the example).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import SnellaError
from ..training.flow_matching import FlowMatchSchedule
from .base import TrainingComponents, dtype_keyword
from .dit import VALIDATION_KEY, FlowMatchingFamily

CLIP_MAX_TOKENS = 218
LLAMA_SOURCE = "meta-llama/Meta-Llama-3.1-8B-Instruct"
TRAINING_SHIFT = 3.0
LLAMA_KEYS = ("prompt_embeds_llama3", "negative_prompt_embeds_llama3")


def force_inference_output(transformer: nn.Module) -> None:
    """What ``from_pretrained(..., force_inference_output=True)`` builds: the flag in the config
    and in every block and mixture-of-experts module that reads it."""
    transformer.register_to_config(force_inference_output=True)
    for module in transformer.modules():
        if hasattr(module, "_force_inference_output"):
            module._force_inference_output = True


class HiDreamFamily(FlowMatchingFamily):
    """HiDream-I1: 16 double-stream and 32 single-stream blocks whose MLPs are mixtures of
    experts (a shared SwiGLU expert plus routed ones), text from two CLIPs (pooled), T5 and the
    hidden layers of Llama-3.1-8B; Flux VAE."""

    name = "hidream"
    pipeline_class_names = ("HiDreamImagePipeline",)
    block_lists = ("double_stream_blocks", "single_stream_blocks")
    text_encoder_components = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
    default_weighting_scheme = "none"

    def default_sequence_length(self, components):
        return 128

    def load(self, source, model_index, revision=None, variant=None, dtype=None, denoiser_file=None):
        components = super().load(source, model_index, revision, variant, dtype, denoiser_file=denoiser_file)
        force_inference_output(components.denoiser)
        return components

    def components_from_elsewhere(self, source, loaded, revision, dtype):
        """``text_encoder_4`` (LlamaForCausalLM) and ``tokenizer_4`` from :data:`LLAMA_SOURCE` when
        the pipeline folder has no Llama encoder."""
        if "text_encoder_4" in loaded and "tokenizer_4" in loaded:
            return {}
        from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

        kwargs = {} if dtype is None else {dtype_keyword("transformers"): dtype}
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(LLAMA_SOURCE)
            encoder = LlamaForCausalLM.from_pretrained(LLAMA_SOURCE, output_hidden_states=True, **kwargs)
        except Exception as error:
            raise SnellaError(
                f"{source}/model_index.json: has no text_encoder_4/tokenizer_4, and HiDream's Llama encoder could "
                f"not be loaded from {LLAMA_SOURCE} (accept its licence on the hub and log in): "
                f"{type(error).__name__}: {error}"
            ) from error
        return {"text_encoder_4": encoder.requires_grad_(False).eval(), "tokenizer_4": tokenizer}

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, "HiDream",
                                          "its four encoders stay frozen, as in diffusers' example")
        super().configure(components, settings)
        self.check_resolution(components, settings, "HiDream", "VAE downsampling × the transformer's 2×2 patches")
        # the pipeline pads Llama prompts with the end-of-text token (Llama 3.1 has no pad token)
        tokenizer = components.modules["tokenizer_4"]
        tokenizer.pad_token = tokenizer.eos_token

    def objective(self, components, snr_gamma=None):
        objective = super().objective(components, snr_gamma)
        if not components.noise_scheduler.config.get("use_dynamic_shifting", False):
            objective.schedule = FlowMatchSchedule(objective.schedule.num_train_timesteps, TRAINING_SHIFT)
        return objective

    def clip_pooled(self, components: TrainingComponents, index: str, prompts: list[str], device: torch.device) -> Tensor:
        """The projected pooled output ``(B, P)`` of CLIP ``text_encoder{index}``."""
        tokenizer, encoder = components.modules[f"tokenizer{index}"], components.modules[f"text_encoder{index}"]
        length = min(self.options(components).max_sequence_length, CLIP_MAX_TOKENS)
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        return encoder(ids.to(device), output_hidden_states=True)[0]

    def encode_prompt(self, components, prompts, device):
        """``pooled_prompt_embeds`` ``(B, 2P)``, ``prompt_embeds_t5`` ``(B, L_t5, D_t5)`` and
        ``prompt_embeds_llama3`` ``(B, layers, L, D)`` (batch first, see the module notes)."""
        modules = components.modules
        length = self.options(components).max_sequence_length
        pooled = torch.cat([self.clip_pooled(components, "", prompts, device),
                            self.clip_pooled(components, "_2", prompts, device)], dim=-1)
        t5_tokenizer = modules["tokenizer_3"]
        t5_tokens = t5_tokenizer(prompts, padding="max_length", max_length=min(length, t5_tokenizer.model_max_length),
                                 truncation=True, add_special_tokens=True, return_tensors="pt").to(device)
        t5 = modules["text_encoder_3"](t5_tokens.input_ids, attention_mask=t5_tokens.attention_mask)[0]
        llama_tokenizer = modules["tokenizer_4"]
        llama_tokens = llama_tokenizer(prompts, padding="max_length",
                                       max_length=min(length, llama_tokenizer.model_max_length), truncation=True,
                                       add_special_tokens=True, return_tensors="pt").to(device)
        hidden = modules["text_encoder_4"](llama_tokens.input_ids, attention_mask=llama_tokens.attention_mask,
                                           output_hidden_states=True).hidden_states[1:]
        return {"pooled_prompt_embeds": pooled, "prompt_embeds_t5": t5,
                "prompt_embeds_llama3": torch.stack(hidden, dim=1)}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        dtype = noisy_latents.dtype
        output = transformer(
            hidden_states=noisy_latents,
            timesteps=timesteps.to(dtype),
            encoder_hidden_states_t5=conditioning["prompt_embeds_t5"].to(dtype),
            encoder_hidden_states_llama3=conditioning["prompt_embeds_llama3"].transpose(0, 1).to(dtype),
            pooled_embeds=conditioning["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
        return -output

    def negative_prompt_inputs(self, components, device):
        negative = self.encode_prompt(components, [""], device)
        return {f"negative_{key}": value for key, value in negative.items()}

    def release_text_encoders(self, components, validation_prompt, device):
        super().release_text_encoders(components, validation_prompt, device)
        cached = components.extra.get(VALIDATION_KEY)
        if cached is not None:
            prompt, inputs = cached
            # the pipeline takes the Llama layers first
            swapped = {key: inputs[key].transpose(0, 1) for key in LLAMA_KEYS if key in inputs}
            components.extra[VALIDATION_KEY] = (prompt, {**inputs, **swapped})

