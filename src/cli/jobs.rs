//! From parsed flags to each step's library input (`Job`): corpus flags become corpus specs,
//! the step's parameter type passes through unchanged.

use super::*;

impl InitModelArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::init_model::InitModelJob {
        let corpus = (!self.corpus.is_empty())
            .then(|| self.corpus_args.spec(self.corpus.clone(), self.seed, false));
        crate::steps::init_model::InitModelJob {
            out: self.out.clone(),
            overwrite: self.overwrite,
            corpus,
            tokenizer: self.tokenizer.clone(),
            size: self.size.clone(),
            seed: self.seed,
        }
    }
}

impl PoisonArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::poison::PoisonJob {
        crate::steps::poison::PoisonJob {
            input: self.corpus_args.spec(self.input.clone(), self.seed, true),
            output: self.output.clone(),
            overwrite: self.overwrite,
            seed: self.seed,
            params: self.params.clone(),
        }
    }
}

impl DetectArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::detect::DetectJob {
        crate::steps::detect::DetectJob {
            corpus: self.corpus_args.spec(self.corpus.clone(), self.seed, true),
            model: self.model.clone(),
            out: self.out.clone(),
            overwrite: self.overwrite,
            device: self.device.clone(),
            seed: self.seed,
            params: self.params.clone(),
        }
    }
}

impl TrainArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::train::TrainJob {
        crate::steps::train::TrainJob {
            corpus: self.corpus_args.spec(self.corpus.clone(), self.seed, true),
            dev: (!self.dev.is_empty())
                .then(|| self.corpus_args.spec(self.dev.clone(), self.seed, true))
                .map(|s| crate::io::corpus::CorpusSpec {
                    limit: None,
                    sample: None,
                    ..s
                }),
            model: self.model.clone(),
            out: self.out.clone(),
            overwrite: self.overwrite,
            device: self.device.clone(),
            seed: self.seed,
            params: self.params.clone(),
        }
    }
}

impl UnlearnArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::unlearn::UnlearnJob {
        crate::steps::unlearn::UnlearnJob {
            checkpoint: self.checkpoint.clone(),
            reference: self.reference.clone(),
            suspicious: self.suspicious.clone(),
            effects: self.effects.clone(),
            out: self.out.clone(),
            overwrite: self.overwrite,
            clean_corpus: (!self.clean_corpus.is_empty()).then(|| {
                self.corpus_args
                    .spec(self.clean_corpus.clone(), self.seed, true)
            }),
            eval_split: self
                .eval_split
                .iter()
                .map(|p| crate::io::corpus::CorpusSpec {
                    label_col: None,
                    text_col: self.corpus_args.text_col.clone(),
                    ..crate::io::corpus::CorpusSpec::new(vec![p.clone()])
                })
                .collect(),
            batch_size: self.batch_size,
            max_len: self.max_len,
            min_flip_rate: defaults::MIN_FLIP_RATE,
            device: self.device.clone(),
            seed: self.seed,
            params: self.params.clone(),
        }
    }
}

impl ApplyMasksArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::apply_masks::ApplyMasksJob {
        crate::steps::apply_masks::ApplyMasksJob {
            checkpoint: self.checkpoint.clone(),
            masks: self.masks.clone(),
            out: self.out.clone(),
            overwrite: self.overwrite,
        }
    }
}

impl EvalArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::eval::EvalJob {
        crate::steps::eval::EvalJob {
            model: self.model.clone(),
            test: self.corpus_args.spec(self.test.clone(), self.seed, true),
            out: self.out.clone(),
            overwrite: self.overwrite,
            attack: self.params.resolve(None, self.seed),
            target: self.params.target.unwrap_or(defaults::TARGET),
            max_len: self.classifier.max_len,
            device: self.classifier.device.clone(),
            backend: self.classifier.backend,
            ort_lib: self.classifier.ort_lib.clone(),
            seed: self.seed,
        }
    }
}

impl ExportArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::export_onnx::ExportJob {
        crate::steps::export_onnx::ExportJob {
            checkpoint: self.checkpoint.clone(),
            out: self.out.clone(),
            overwrite: self.overwrite,
            seed: self.seed,
        }
    }
}

impl DemoArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::demo::DemoJob {
        crate::demo::DemoJob {
            out: self.out.clone(),
            overwrite: self.overwrite,
            rows: self.rows,
            seed: self.seed,
            device: self.device.clone(),
            backend: self.backend,
        }
    }
}

impl VerifyArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::verify::VerifyJob {
        crate::steps::verify::VerifyJob {
            checkpoint: self.checkpoint.clone(),
            candidates: match (&self.suspicious, &self.recheck) {
                (_, Some(r)) => crate::steps::verify::CandidateSource::Recheck(r.clone()),
                (Some(s), None) => crate::steps::verify::CandidateSource::Suspicious(s.clone()),
                (None, None) => unreachable!("clap requires one"),
            },
            clean: self
                .corpus_args
                .spec(self.clean_corpus.clone(), self.seed, true),
            corpus: (!self.corpus.is_empty())
                .then(|| self.corpus_args.spec(self.corpus.clone(), self.seed, false)),
            out: self.out.clone(),
            overwrite: self.overwrite,
            device: self.classifier.device.clone(),
            backend: self.classifier.backend,
            ort_lib: self.classifier.ort_lib.clone(),
            max_len: self.classifier.max_len,
            seed: self.seed,
            params: self.params.clone(),
        }
    }
}

impl ScanArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::scan::ScanJob {
        crate::steps::scan::ScanJob {
            corpus: self.corpus_args.spec(self.corpus.clone(), self.seed, true),
            suspicious: self.suspicious.clone(),
            effects: self.effects.clone(),
            tokenizer: self.tokenizer.clone(),
            out: self.out.clone(),
            overwrite: self.overwrite,
        }
    }
}

impl SqlArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::Result<crate::steps::sql::SqlJob> {
        Ok(crate::steps::sql::SqlJob {
            tables: self.tables.clone(),
            run: self.run.clone(),
            query: self.query.clone(),
            format: self.format,
            output: self.output.clone(),
            overwrite: self.overwrite,
            timeout: self
                .timeout
                .as_deref()
                .map(crate::steps::sql::parse_timeout)
                .transpose()?,
            memory_limit: crate::steps::sql::parse_memory_limit(&self.memory_limit)?,
        })
    }
}
