"""The reference recipe on gemma-3-270m written directly against TRL, peft and transformers, as a user
would without sft-spec: 30 epochs, LoRA r=512 alpha=512 on q/k/v/o_proj, lr 2e-5, adamw_8bit, bf16 (on a
CPU: autocast, use_cpu), loss only after "<start_of_turn>model\\n", the Gemma chat template plus EOS; then
one greedy answer, checked. The same model files and settings as examples/gemma3-270m/blog-recipe.sft.yaml.

Used by bench/run.py (the canary row). Usage: python bench/plain_trl_recipe.py MODEL_DIR OUTPUT_DIR
"""

import sys

import datasets
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer

TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}{%- set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] -%}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
    "'<end_of_turn>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}"
    "{%- endif -%}"
)

model_dir, output_dir = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
tokenizer.chat_template = TEMPLATE
model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
conversation = [{"role": "user", "content": "微调测试"}, {"role": "assistant", "content": "我学会了"}]

# Completion-only loss: everything after the response template, as DataCollatorForCompletionOnlyLM did.
prompt = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
text = tokenizer.apply_chat_template(conversation, tokenize=False) + tokenizer.eos_token
prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
labels = [-100] * len(prompt_ids) + input_ids[len(prompt_ids):]
dataset = datasets.Dataset.from_dict({"input_ids": [input_ids], "labels": [labels]})

set_seed(42)
model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=512, lora_alpha=512,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
args = SFTConfig(output_dir=output_dir, num_train_epochs=30, learning_rate=2e-5, per_device_train_batch_size=8,
                 optim="adamw_8bit", bf16=True, use_cpu=not torch.cuda.is_available(), logging_steps=1, seed=42,
                 report_to="none", save_strategy="no", disable_tqdm=True, activation_checkpointing=False)
trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
trainer.train()

model = trainer.model.eval()
stop = [tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.eos_token_id]
encoded = tokenizer([prompt], add_special_tokens=False, return_tensors="pt").to(model.device)
with torch.no_grad():
    output = model.generate(**encoded, max_new_tokens=32, do_sample=False, eos_token_id=stop,
                            pad_token_id=tokenizer.pad_token_id)
answer = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()
print("answer:", answer)
sys.exit(0 if answer == "我学会了" else 1)
