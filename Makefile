# Two commands for a new user: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_OUT ?= outputs/demo
# On a shared machine, OpenMP threads that spin while they wait starve the other process's threads:
# the demo's tiny-model epochs went from 0.7 s to 17 s next to one busy neighbour, and stay at ~1 s
# with passive waiting, which costs the large matrix multiplies nothing (benchmarks/README.md).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test bench figures mutation clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The whole notebook on the synthetic demo data: offline, CPU, tiny random models.
demo: install
	mkdir -p $(DEMO_OUT)
	$(PY) -m papermill entrep-prototypical.ipynb $(DEMO_OUT)/entrep-prototypical.ipynb \
		-f configs/demo.yaml -p output_dir $(DEMO_OUT)
	@echo "Demo written to $(DEMO_OUT): metrics.json, figures/, submission*.zip (synthetic data)"

test: install
	$(PY) -m pytest -q tests

# Speed of embedding, decoding, fine-tuning, the demo and retrieval (README.md "Performance").
bench: install
	$(PY) benchmarks/bench.py --out outputs/benchmark.json --markdown outputs/benchmark.md

# The images README.md shows, regenerated from a demo run.
figures: demo
	cp $(DEMO_OUT)/figures/samples_per_class.png $(DEMO_OUT)/figures/retrieval_gallery_i2i.png \
		$(DEMO_OUT)/figures/confusion_fine_hybrid.png figures/

# Mutation testing of utils.py's core (benchmarks/MUTATION.md; about 20 minutes on 2 cores, not part of `make
# test`): mutmut mutates the functions below, one small change at a time, and runs the fast tests against
# each (pyproject.toml [tool.mutmut]). Then `$(VENV)/bin/mutmut results` lists what survived and
# `$(VENV)/bin/mutmut show NAME` shows a mutant's diff. Names are mutmut's: x_<function>, xǁ<class>ǁ<method>.
# Out of scope: sections 1-2 and 4 (constants are module code, which mutmut does not mutate; setup; CLIP
# loading and caches), plots, the DINOv2 weight files and training loop, sections after 10.
# section 3 data
MUTATION_SCOPE += x_load_rgb x_load_thumbnail x_file_sha1 x_check_image x_normalize_label \
	x_split_finding_lines x_finding_key xǁFileIndexǁbuild xǁFileIndexǁresolve xǁEntrepDataǁsummary \
	xǁEntrepDataǁproblem_lines xǁ_Collectorǁ__init__ xǁ_Collectorǁproblem xǁ_Collectorǁimage \
	xǁ_Collectorǁcheck_all xǁ_Collectorǁok x__read_json x__label_row x__source_name x__load_train_release \
	x__load_public_release x_read_query_csv x__load_queries x__class_folder_rows x_find_annotation_files \
	x_load_entrep x__drop_duplicate_records x_find_leakage x_select_test_queries x_exam_id x_split_groups \
	x_grouped_fold_ids x_split_train_val x_sample_per_class
# section 5 prototypes
MUTATION_SCOPE += x_class_prompts x_add_description_prompts x_image_prototypes x_text_prototypes \
	x_joint_prototypes x_prototype_probs xǁPrototypeClassifierǁpredict_proba x_choose_prototype_weight \
	x_fit_prototype_classifier x_fit_prototypes
# section 6 DINOv2 (not the training loop)
MUTATION_SCOPE += xǁDinoClassifierǁ__init__ xǁDinoClassifierǁforward x_region_targets x_multitask_loss \
	x_class_weights x_task_images x_decode_square x_flip_label_id x_seeded_rng xǁSquareImagesǁ__init__ \
	xǁSquareImagesǁ__len__ xǁSquareImagesǁ__getitem__ x_dino_transform x_dino_image_size x_epoch_seed \
	xǁEpochSamplerǁ__init__ xǁEpochSamplerǁset_epoch xǁEpochSamplerǁ__len__ xǁEpochSamplerǁ__iter__ x__loader \
	x_param_groups x_warmup_cosine x_dino_val_score xǁTrainedDinoǁsummary x_collect_logits x_task_probs \
	x_flip_tta_probs x__dino_rows x_predict_dino x_dino_features
# section 7 hybrid
MUTATION_SCOPE += x__coarse_probs x_region_then_fine x_hybrid_predict x_soft_fusion_predict x_best_grid_value \
	x_choose_fusion
# section 8 results
MUTATION_SCOPE += x__ids x_coarse_of x_summary_metrics x_classification_table x_batched_scores x_bootstrap_ci \
	x_comparison_table x_branch_accuracy
# section 9 retrieval
MUTATION_SCOPE += x_retrieval_gallery x_cosine_topk x_rerank_by_region x_rank_gallery x_retrieval_hits \
	x_retrieval_metrics x_best_retrieval_row x_choose_rerank_beta x_held_out_images x_i2i_eval_set x_validation_distractors \
	x_evaluate_i2i x_caption_queries x_description_queries x__finding_queries x_text_to_image
# section 10 submissions
MUTATION_SCOPE += x_write_submission x_check_submission

mutation: install
	$(PY) -m pip install -q "mutmut==3.8.1"
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run $(foreach f,$(MUTATION_SCOPE),"utils.$(f)__mutmut_*")
	$(PY) benchmarks/mutation.py

clean:
	rm -rf outputs .pytest_cache mutants
