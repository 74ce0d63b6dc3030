//! From parsed flags to each step's library input (`Job`): corpus flags become corpus specs,
//! the step's parameter type passes through unchanged.

use std::path::Path;

use super::*;

impl InitModelArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::init_model::InitModelJob {
        let corpus = (!self.corpus.is_empty()).then(|| {
            self.corpus_args
                .spec(self.corpus.clone(), self.run.seed, false)
        });
        crate::steps::init_model::InitModelJob {
            run: self.run.opts(&self.out, "cpu"),
            corpus,
            tokenizer: self.tokenizer.clone(),
            size: self.size.clone(),
        }
    }
}

impl PoisonArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::poison::PoisonJob {
        crate::steps::poison::PoisonJob {
            run: self.run.opts(&self.output, "cpu"),
            input: self
                .corpus_args
                .spec(self.input.clone(), self.run.seed, true),
            params: self.params.clone(),
        }
    }
}

impl DetectArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::detect::DetectJob {
        crate::steps::detect::DetectJob {
            run: self.run.opts(&self.out, &self.device),
            corpus: self
                .corpus_args
                .spec(self.corpus.clone(), self.run.seed, true),
            model: self.model.clone(),
            params: self.params.clone(),
        }
    }
}

impl TrainArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::train::TrainJob {
        crate::steps::train::TrainJob {
            run: self.run.opts(&self.out, &self.device),
            corpus: self
                .corpus_args
                .spec(self.corpus.clone(), self.run.seed, true),
            dev: (!self.dev.is_empty())
                .then(|| self.corpus_args.spec(self.dev.clone(), self.run.seed, true))
                .map(|s| crate::io::corpus::CorpusSpec {
                    limit: None,
                    sample: None,
                    ..s
                }),
            model: self.model.clone(),
            params: self.params.clone(),
        }
    }
}

impl UnlearnArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::unlearn::UnlearnJob {
        crate::steps::unlearn::UnlearnJob {
            run: self.run.opts(&self.out, &self.batches.device),
            checkpoint: self.checkpoint.clone(),
            reference: self.reference.clone(),
            suspicious: self.suspicious.clone(),
            effects: self.effects.clone(),
            clean_corpus: (!self.clean_corpus.is_empty()).then(|| {
                self.corpus_args
                    .spec(self.clean_corpus.clone(), self.run.seed, true)
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
            batch_size: self.batches.batch_size,
            max_len: self.batches.max_len,
            min_flip_rate: self.min_flip_rate,
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
            run: crate::steps::RunOpts {
                overwrite: self.overwrite,
                ..crate::steps::RunOpts::new(&self.out)
            },
        }
    }
}

impl EvalArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::eval::EvalJob {
        crate::steps::eval::EvalJob {
            run: self.run.opts(&self.out, &self.classifier.device),
            model: self.model.clone(),
            test: self
                .corpus_args
                .spec(self.test.clone(), self.run.seed, true),
            attack: self.params.resolve(None, self.run.seed),
            target: self.params.target.unwrap_or(defaults::TARGET),
            max_len: self.classifier.max_len,
            backend: self.classifier.backend,
            ort_lib: self.classifier.ort_lib.clone(),
        }
    }
}

impl ExportArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::export_onnx::ExportJob {
        crate::steps::export_onnx::ExportJob {
            run: self.run.opts(&self.out, "cpu"),
            checkpoint: self.checkpoint.clone(),
        }
    }
}

impl DemoArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::demo::DemoJob {
        crate::demo::DemoJob {
            out: self.out.clone(),
            overwrite: self.run.overwrite,
            rows: self.rows,
            seed: self.run.seed,
            device: self.device.clone(),
            backend: self.backend,
        }
    }
}

impl VerifyArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::verify::VerifyJob {
        crate::steps::verify::VerifyJob {
            run: self.run.opts(&self.out, &self.classifier.device),
            checkpoint: self.checkpoint.clone(),
            candidates: match (&self.suspicious, &self.recheck) {
                (_, Some(r)) => crate::steps::verify::CandidateSource::Recheck(r.clone()),
                (Some(s), None) => crate::steps::verify::CandidateSource::Suspicious(s.clone()),
                (None, None) => unreachable!("clap requires one"),
            },
            clean: self
                .corpus_args
                .spec(self.clean_corpus.clone(), self.run.seed, true),
            corpus: (!self.corpus.is_empty()).then(|| {
                self.corpus_args
                    .spec(self.corpus.clone(), self.run.seed, false)
            }),
            backend: self.classifier.backend,
            ort_lib: self.classifier.ort_lib.clone(),
            max_len: self.classifier.max_len,
            params: self.params.clone(),
        }
    }
}

impl RelabelArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::relabel::RelabelJob {
        let seed = self.run.seed;
        crate::steps::relabel::RelabelJob {
            run: self.run.opts(&self.out, &self.batches.device),
            corpus: self.corpus_args.spec(self.corpus.clone(), seed, true),
            clean: crate::io::corpus::CorpusSpec {
                filter: self.clean_filter.clone(),
                limit: None,
                sample: None,
                ..self.corpus_args.spec(self.clean_corpus.clone(), seed, true)
            },
            model: self.model.clone(),
            suspect: self.suspect.clone(),
            train: crate::steps::train::TrainParams {
                batch_size: self.batches.batch_size,
                max_len: self.batches.max_len,
                ..Default::default()
            },
            params: self.params.clone(),
        }
    }
}

impl ScanArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::scan::ScanJob {
        // --suspicious, --tokenizer and --out are required unless --plan (which scans nothing).
        crate::steps::scan::ScanJob {
            run: self
                .run
                .opts(self.out.as_deref().unwrap_or(Path::new("")), "cpu"),
            corpus: crate::io::corpus::CorpusSpec {
                shard: self.shard,
                ..self
                    .corpus_args
                    .spec(self.corpus.clone(), self.run.seed, true)
            },
            suspicious: self.suspicious.clone().unwrap_or_default(),
            effects: self.effects.clone(),
            tokenizer: self.tokenizer.clone().unwrap_or_default(),
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

impl ReportArgs {
    /// The library's input for these flags.
    pub fn job(&self) -> crate::steps::report::ReportJob {
        crate::steps::report::ReportJob {
            dir: self.run.clone(),
            scans: self.scan.clone(),
            tokenizer: self.tokenizer.clone(),
            run: crate::steps::RunOpts {
                overwrite: self.overwrite,
                ..crate::steps::RunOpts::new(&self.out)
            },
        }
    }
}
