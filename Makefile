# Two commands for a new user: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_OUT ?= outputs/demo
DEMO_ARGS ?=  # more papermill parameters, e.g. DEMO_ARGS="-p resize pad"
# On a shared machine, OpenMP threads that spin while they wait starve the other process's threads:
# the demo's tiny-model epochs went from 0.7 s to 17 s next to one busy neighbour, and stay at ~1 s
# with passive waiting, which costs the large matrix multiplies nothing (benchmarks/README.md).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test bench figures mutation clean kaggle-wheels

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The whole notebook on the synthetic demo data: offline, CPU, tiny random models.
demo: install
	mkdir -p $(DEMO_OUT)
	$(PY) -m papermill entrep-prototypical.ipynb $(DEMO_OUT)/entrep-prototypical.ipynb \
		-f configs/demo.yaml -p output_dir $(DEMO_OUT) $(DEMO_ARGS)
	@echo "Demo written to $(DEMO_OUT): metrics.json, figures/, submission*.zip (synthetic data)"

test: install
	$(PY) -m pytest -q tests

# The one Kaggle dataset a run with internet off needs besides data and weights (kaggle/README.md): the project's
# modules, the notebook, its configs, and wheels of what Kaggle's image lacks, at the versions installed here.
KAGGLE_DIST ?= dist/kaggle
KAGGLE_WHEELS = open_clip_torch ftfy wcwidth
kaggle-wheels: install
	rm -rf $(KAGGLE_DIST) && mkdir -p $(KAGGLE_DIST)/wheels $(KAGGLE_DIST)/configs
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d $(KAGGLE_DIST)/wheels \
		$(foreach p,$(KAGGLE_WHEELS),"$(p)==$$($(PY) -c 'import importlib.metadata as m; print(m.version("$(p)"))')")
	cp *.py entrep-prototypical.ipynb $(KAGGLE_DIST)/  # every module: a new one is never left behind
	cp configs/*.yaml $(KAGGLE_DIST)/configs/
	cp kaggle/README.md kaggle/dataset-metadata.json $(KAGGLE_DIST)/
	@echo "Wrote $(KAGGLE_DIST): attach it to the Kaggle notebook as one dataset (kaggle/README.md)"

# Speed of embedding, decoding, fine-tuning, the demo and retrieval (README.md "Performance").
bench: install
	$(PY) benchmarks/bench.py --out outputs/benchmark.json --markdown outputs/benchmark.md

# The images README.md shows, regenerated from a demo run.
figures: demo
	cp $(DEMO_OUT)/figures/samples_per_class.png $(DEMO_OUT)/figures/retrieval_gallery_i2i.png \
		$(DEMO_OUT)/figures/confusion_fine_hybrid.png figures/

# Mutation testing of the method's core (benchmarks/MUTATION.md; about 20 minutes on 2 cores, not part of
# `make test`): mutmut mutates the functions below, one small change at a time, and runs the fast tests against
# each (pyproject.toml [tool.mutmut]). Then `$(VENV)/bin/mutmut results` lists what survived and
# `$(VENV)/bin/mutmut show NAME` shows a mutant's diff. Names are mutmut's: <module>.x_<function>,
# <module>.xǁ<class>ǁ<method>. Out of scope: constants (module code, which mutmut does not mutate), setup, CLIP
# loading and caches, figures other than thumbnails, the DINOv2 weight files, and the training harness with the
# recipes it runs (training.fit and what it calls per epoch: the notebook and training tests cover them).
# utils.py, section 1 label maps and section 3 data
MUTATION_SCOPE += utils.x__ids utils.x_coarse_of utils.x_flip_label_id utils.xǁLevelǁids utils.xǁLevelǁnames \
	utils.x_load_rgb utils.x_file_sha1 utils.x_check_image utils.x_normalize_label utils.x_split_finding_lines \
	utils.x_finding_key utils.xǁFileIndexǁbuild utils.xǁFileIndexǁresolve utils.xǁEntrepDataǁsummary \
	utils.xǁEntrepDataǁproblem_lines utils.xǁ_Ledgerǁ__init__ utils.xǁ_Ledgerǁproblem utils.xǁ_Ledgerǁrecord \
	utils.xǁ_Ledgerǁimage utils.xǁ_Ledgerǁsource utils.xǁ_Ledgerǁcheck_all utils.xǁ_Ledgerǁok utils.x__read_json \
	utils.x__label_row utils.x__load_train_release utils.x__load_public_release utils.x_read_query_csv \
	utils.x__load_queries utils.x__load_class_folders utils.x_find_annotation_files utils.x_load_entrep \
	utils.x__tables utils.x__drop_duplicate_records utils.x_find_leakage utils.x_select_test_queries utils.x_exam_id \
	utils.x_split_groups utils.x_grouped_fold_ids utils.x_split_train_val utils.x_sample_per_class plots.x_load_thumbnail
# utils.py, sections 5-6: scores and prototypes
MUTATION_SCOPE += utils.x_summary_metrics utils.x_classification_table utils.x_batched_scores utils.x_bootstrap_ci \
	utils.x_comparison_table utils.x_class_prompts utils.x_add_description_prompts utils.x_image_prototypes \
	utils.x_text_prototypes utils.x_joint_prototypes utils.x_prototype_probs utils.xǁPrototypeClassifierǁpredict_proba \
	utils.x_choose_prototype_weight utils.x_fit_prototype_classifier utils.x_fit_prototypes
# utils.py, section 7 DINOv2 heads, images and inference; training.py, its losses, data and schedule
MUTATION_SCOPE += utils.xǁDinoClassifierǁ__init__ utils.xǁDinoClassifierǁforward utils.x_decode_square \
	utils.x_seeded_rng utils.xǁSquareImagesǁ__init__ utils.xǁSquareImagesǁ__len__ utils.xǁSquareImagesǁ__getitem__ \
	utils.x_dino_data_config utils.x_dino_transform utils.x_dino_image_size utils.x_make_loader \
	utils.xǁTrainedǁsummary utils.x_collect_logits utils.x_task_probs utils.x_flip_tta_probs \
	utils.x__cached_dino_rows utils.x_predict_dino utils.x_dino_features \
	training.x_region_targets training.x_multitask_loss training.x_class_weights training.x_task_images \
	training.x_epoch_seed training.xǁEpochSamplerǁ__init__ training.xǁEpochSamplerǁset_epoch \
	training.xǁEpochSamplerǁ__len__ training.xǁEpochSamplerǁ__iter__ training.x_param_groups training.x_warmup_cosine \
	training.x_dino_val_score
# utils.py, sections 8-9: hybrid and submissions
MUTATION_SCOPE += utils.x__coarse_probs utils.x_region_then_fine utils.x_dino_labels utils.x_hybrid_predict utils.x_soft_fusion_predict \
	utils.x_best_grid_value utils.x_choose_fusion utils.x_branch_accuracy utils.x_write_submission \
	utils.x_check_submission
# retrieval.py
MUTATION_SCOPE += retrieval.x_gallery_images retrieval.x_annotated_images retrieval.x_held_out_images \
	retrieval.x_unseen_images retrieval.x_unique_content retrieval.x_pad_gallery retrieval.x_i2i_eval_set \
	retrieval.x_gallery_info retrieval.x_description_queries retrieval.x_caption_queries retrieval.x_t2i_eval_queries \
	retrieval.x_t2i_subsets retrieval.x__ranked retrieval.x_same_content retrieval.x_cosine_topk \
	retrieval.x_fused_scores retrieval.x_k_reciprocal retrieval.x_reciprocal_ranks retrieval.x_one_to_one \
	retrieval.x_rank_i2i retrieval.x_rank_t2i retrieval.x_retrieval_hits retrieval.x_retrieval_metrics \
	retrieval.x_best_retrieval_row retrieval.x_fusion_grid retrieval.x_i2i_stages retrieval.x_t2i_stages \
	retrieval.x_default_setting retrieval.x_choose_setting retrieval.x_select_out_of_fold retrieval.x_linked_groups \
	retrieval.x_selection_report retrieval.x_selection_block

mutation: install
	$(PY) -m pip install -q "mutmut==3.8.1"
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run $(foreach f,$(MUTATION_SCOPE),"$(f)__mutmut_*")
	$(PY) benchmarks/mutation.py

clean:
	rm -rf outputs .pytest_cache mutants dist
