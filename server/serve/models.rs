//! The models a server serves: each with its own engine thread, found by name or alias.

use super::api::ApiError;
use super::engine::{self, Capacity, Job};
use super::metrics::Metrics;
use crate::commands::EngineArgs;
use crate::model::{Model, Source};
use anyhow::{bail, Context};
use kiln_runtime::chat::ChatTemplate;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// One served model.
pub struct Served {
    pub name: String,
    pub model: Arc<Model>,
    /// Context size per request.
    pub ctx: usize,
    pub template: Option<ChatTemplate>,
    /// KV positions its engine has for all the sequences it runs at once.
    pub kv_positions: usize,
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
}

impl Served {
    /// Opens the model and starts its engine thread, which generates up to `capacity.max_running` sequences at once.
    pub fn load(
        name: &str,
        path: &Path,
        ctx: usize,
        capacity: Capacity,
        engine_args: &EngineArgs,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let model = Arc::new(
            Model::open_to_run(path, engine_args).with_context(|| format!("model `{name}`"))?,
        );
        let ctx = if ctx == 0 {
            model.info.context_length.min(4096)
        } else {
            ctx
        };
        let tokenizer = &model.tokenizer;
        let token_text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_text(i))
                .unwrap_or("")
                .to_string()
        };
        let template = match &model.info.chat_template {
            Some(source) => Some(ChatTemplate::new(
                source,
                &token_text(tokenizer.bos()),
                &token_text(tokenizer.spec().eos),
            )?),
            None => None,
        };
        let (format, target) = match &model.source {
            Source::Plan(plan) => (
                kiln_ir::plan::FORMAT_VERSION.to_string(),
                plan.meta.targets_text(),
            ),
            Source::Gguf(_) => (
                "gguf".to_string(),
                kiln_runtime::plan::host_target().to_string(),
            ),
        };
        metrics.plan_loaded(name, &format, &target);
        let (jobs, kv_positions) = engine::spawn(
            Arc::clone(&model),
            ctx,
            engine_args.clone(),
            Arc::clone(metrics),
            capacity,
        )?;
        Ok(Served {
            name: name.to_string(),
            model,
            ctx,
            template,
            kv_positions,
            jobs: Mutex::new(jobs),
        })
    }

    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let jobs = self
            .jobs
            .lock()
            .map_err(|_| ApiError::internal("engine lock poisoned"))?;
        jobs.send(job)
            .map_err(|_| ApiError::internal(format!("the engine of `{}` has stopped", self.name)))
    }
}

/// Every served model, and the names (and aliases) that reach them.
pub struct Registry {
    models: Vec<Arc<Served>>,
    names: HashMap<String, usize>,
    aliases: Vec<(String, String)>,
}

impl Registry {
    /// How many models it serves.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// `models` are (name, path) pairs; `aliases` (alias, name) pairs.
    pub fn load(
        models: &[(String, &Path)],
        aliases: &[(String, String)],
        ctx: usize,
        capacity: Capacity,
        engine_args: &EngineArgs,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        if models.is_empty() {
            bail!("nothing to serve: give a plan, or --model NAME=PATH");
        }
        let mut names = HashMap::new();
        let mut loaded = Vec::new();
        for (i, (name, path)) in models.iter().enumerate() {
            if names.insert(name.clone(), i).is_some() {
                bail!("two models are named `{name}`");
            }
            loaded.push(Arc::new(Served::load(
                name,
                path,
                ctx,
                capacity,
                engine_args,
                metrics,
            )?));
        }
        for (alias, target) in aliases {
            let Some(&i) = names.get(target) else {
                bail!("--alias {alias}={target}: no model is named `{target}`")
            };
            if names.insert(alias.clone(), i).is_some() {
                bail!("--alias {alias}: that name is taken");
            }
        }
        Ok(Registry {
            models: loaded,
            names,
            aliases: aliases.to_vec(),
        })
    }

    /// The model a request names; a request that names none gets the only model, if there is one.
    pub fn resolve(&self, requested: Option<&str>) -> Result<&Arc<Served>, ApiError> {
        match requested {
            Some(name) => self
                .names
                .get(name)
                .map(|&i| &self.models[i])
                .ok_or_else(|| {
                    let known: Vec<&str> = self.names.keys().map(String::as_str).collect();
                    ApiError::not_found(format!(
                        "The model `{name}` does not exist; this server serves: {}.",
                        sorted(known).join(", ")
                    ))
                }),
            None if self.models.len() == 1 => Ok(&self.models[0]),
            None => Err(ApiError::bad_request(
                "model",
                "this server serves several models: name one in `model`",
            )),
        }
    }

    /// `/v1/models`: every model, then every alias (with the model it stands for as `parent`).
    pub fn listing(&self) -> Value {
        let mut data: Vec<Value> = self
            .models
            .iter()
            .map(|m| json!({ "id": m.name, "object": "model", "created": 0, "owned_by": "kiln" }))
            .collect();
        for (alias, target) in &self.aliases {
            data.push(json!({ "id": alias, "object": "model", "created": 0, "owned_by": "kiln", "parent": target }));
        }
        json!({ "object": "list", "data": data })
    }
}

fn sorted(mut v: Vec<&str>) -> Vec<&str> {
    v.sort_unstable();
    v
}
