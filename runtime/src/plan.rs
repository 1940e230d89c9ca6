//! Loading plan files: mmap, verify every checksum, check the target, and serve weights in place, or from a copy
//! in huge pages (`PlanFile::move_to_huge_pages`).

use kiln_ir::cuda_abi::CudaCode;
use kiln_ir::plan::{
    self, CodeEntry, PlanMeta, SectionEntry, SectionKind, Target, WeightEntry, ENTRY_BYTES,
    HEADER_BYTES,
};
use kiln_ir::schedule::Schedule;
use kiln_ir::weights::{WeightSource, WeightView};
use kiln_ir::Graph;
use memmap2::{Mmap, MmapOptions, UncheckedAdvice};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a kiln plan (no KILNPLAN magic at byte 0)")]
    NotAPlan,
    #[error("plan format version {found}, but this kiln reads version {supported}: recompile the model with this kiln (`kiln compile MODEL.gguf -o PLAN`)")]
    Version { found: u32, supported: u32 },
    #[error("the plan is truncated: {0}")]
    Truncated(String),
    #[error("the plan is corrupted: {0} (recompile it, or copy it again)")]
    Corrupt(String),
    #[error("the plan's {section} section is invalid: {reason}")]
    Invalid {
        section: &'static str,
        reason: String,
    },
    #[error("the plan was compiled for {target}, which this host cannot run: {reason}; compile it here with `kiln compile MODEL.gguf --target native`")]
    Target { target: Target, reason: String },
    #[error("the plan has no CPU code (it was compiled with `--target {targets}`); compile it with `kiln compile MODEL.gguf --target native` (or `--target cpu,cuda` for a plan that serves on either)")]
    NoCpuTarget { targets: String },
}

pub struct PlanFile {
    map: Mmap,
    pub meta: PlanMeta,
    pub graph: Graph,
    pub schedule: Schedule,
    sections: Vec<SectionEntry>,
    weights: Vec<WeightEntry>,
    by_name: HashMap<String, usize>,
    weights_start: usize,
    code_index: Vec<CodeEntry>,
    cuda: Option<CudaCode>,
}

impl PlanFile {
    pub fn open(path: &Path) -> Result<Self, PlanError> {
        let io = |source| PlanError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: read-only map of a file kiln does not modify; every byte is checksummed before use.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::load(map)
    }

    /// Moves the plan's bytes from the file's mapping into anonymous memory backed by transparent huge pages, and
    /// says whether it did (not where the kernel has no huge pages for it, or on hosts other than Linux).
    ///
    /// Why: decode streams every weight once per token, and with 4 KiB pages that costs a TLB miss every 4 KiB. A
    /// file's page cache is mapped with 2 MiB pages only where the kernel happened to cache it in large folios (a
    /// tenth to a fifth of a freshly written SmolLM2 plan, here), so a plan's speed depended on its page cache:
    /// in huge pages, SmolLM2's LM head ran 11% faster and its gated FFN 4%. The copy costs the plan's size in
    /// memory no other process shares (the page cache's copy stays reclaimable) and one pass over it at load. The
    /// copied bytes are the verified bytes; the file's pages leave this process as they are copied, so its
    /// resident memory does not double.
    pub fn move_to_huge_pages(&mut self) -> Result<bool, PlanError> {
        if !huge_pages_available() || self.map.is_empty() {
            return Ok(false);
        }
        let io = |source| PlanError::Io {
            path: "anonymous memory for the plan".into(),
            source,
        };
        let mut copy = MmapOptions::new()
            .len(self.map.len())
            .map_anon()
            .map_err(io)?;
        #[cfg(target_os = "linux")]
        copy.advise(memmap2::Advice::HugePage).map_err(io)?;
        const CHUNK: usize = 64 << 20;
        for start in (0..self.map.len()).step_by(CHUNK) {
            let end = (start + CHUNK).min(self.map.len());
            copy[start..end].copy_from_slice(&self.map[start..end]);
            // SAFETY: nothing borrows the mapping while `&mut self` is held, and the file's pages come back from
            // the page cache if they are read again. Advice that fails only leaves the pages mapped until the
            // mapping is dropped below.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
            };
        }
        self.map = copy.make_read_only().map_err(io)?;
        Ok(true)
    }

    fn load(map: Mmap) -> Result<Self, PlanError> {
        let bytes: &[u8] = &map;
        if bytes.len() < 8 || bytes[..8] != plan::MAGIC {
            return Err(PlanError::NotAPlan);
        }
        if bytes.len() < HEADER_BYTES {
            return Err(PlanError::Truncated(format!(
                "{} bytes, shorter than the header",
                bytes.len()
            )));
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let version = u32_at(8);
        if version != plan::FORMAT_VERSION {
            return Err(PlanError::Version {
                found: version,
                supported: plan::FORMAT_VERSION,
            });
        }
        let count = u32_at(12) as usize;
        if count != SectionKind::ALL.len() {
            return Err(PlanError::Corrupt(format!(
                "the header lists {count} sections, a version {version} plan has {}",
                SectionKind::ALL.len()
            )));
        }
        let table_end = HEADER_BYTES + count * ENTRY_BYTES;
        if bytes.len() < table_end {
            return Err(PlanError::Truncated("the section table is cut off".into()));
        }
        let stored = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if plan::table_checksum(&bytes[..16], &bytes[HEADER_BYTES..table_end]) != stored
            || bytes[24..32] != [0; 8]
        {
            return Err(PlanError::Corrupt(
                "the header or section table fails its checksum".into(),
            ));
        }
        let sections: Vec<SectionEntry> = bytes[HEADER_BYTES..table_end]
            .chunks_exact(ENTRY_BYTES)
            .map(|c| SectionEntry::decode(c.try_into().expect("entry size")))
            .collect();
        for (entry, kind) in sections.iter().zip(SectionKind::ALL) {
            if entry.kind != kind as u32 {
                return Err(PlanError::Corrupt(format!(
                    "section {} is of kind {}, expected {}",
                    kind as u32,
                    entry.kind,
                    kind.name()
                )));
            }
            let end = entry
                .offset
                .checked_add(entry.len)
                .filter(|&e| e <= bytes.len() as u64);
            let Some(end) = end else {
                return Err(PlanError::Truncated(format!(
                    "the {} section ends past the end of the file ({} bytes)",
                    kind.name(),
                    bytes.len()
                )));
            };
            if plan::checksum(&bytes[entry.offset as usize..end as usize]) != entry.checksum {
                return Err(PlanError::Corrupt(format!(
                    "the {} section fails its checksum",
                    kind.name()
                )));
            }
        }
        // Bytes no checksum covers (alignment padding) must be zero, so that no flipped byte goes unnoticed.
        let mut covered = table_end;
        for e in &sections {
            if (e.offset as usize) < covered {
                return Err(PlanError::Corrupt(format!(
                    "the section at byte {} overlaps the one before",
                    e.offset
                )));
            }
            if bytes[covered..e.offset as usize].iter().any(|&b| b != 0) {
                return Err(PlanError::Corrupt(format!(
                    "padding before byte {} is not zero",
                    e.offset
                )));
            }
            covered = (e.offset + e.len) as usize;
        }
        if covered != bytes.len() {
            return Err(PlanError::Corrupt(format!(
                "{} unexpected bytes after the last section",
                bytes.len() - covered
            )));
        }
        let section = |kind: SectionKind| {
            let e = &sections[kind as usize - 1];
            &bytes[e.offset as usize..(e.offset + e.len) as usize]
        };
        let meta: PlanMeta =
            serde_json::from_slice(section(SectionKind::Meta)).map_err(|e| PlanError::Invalid {
                section: "meta",
                reason: e.to_string(),
            })?;
        let graph_text =
            std::str::from_utf8(section(SectionKind::Graph)).map_err(|e| PlanError::Invalid {
                section: "graph",
                reason: e.to_string(),
            })?;
        let graph = kiln_ir::text::parse(graph_text).map_err(|e| PlanError::Invalid {
            section: "graph",
            reason: e.to_string(),
        })?;
        kiln_ir::verify(&graph).map_err(|e| PlanError::Invalid {
            section: "graph",
            reason: e.to_string(),
        })?;
        let schedule: Schedule =
            serde_json::from_slice(section(SectionKind::Schedule)).map_err(|e| {
                PlanError::Invalid {
                    section: "schedule",
                    reason: e.to_string(),
                }
            })?;
        schedule
            .verify(&graph)
            .map_err(|reason| PlanError::Invalid {
                section: "schedule",
                reason,
            })?;
        let weights: Vec<WeightEntry> = serde_json::from_slice(section(SectionKind::WeightIndex))
            .map_err(|e| PlanError::Invalid {
            section: "weight index",
            reason: e.to_string(),
        })?;
        let weights_section = &sections[SectionKind::Weights as usize - 1];
        for w in &weights {
            let expected = w.layout.stored_bytes(w.format, &w.shape);
            let fits = w
                .offset
                .checked_add(w.len)
                .is_some_and(|end| end as u64 <= weights_section.len);
            if expected != Some(w.len) || !fits || w.offset % plan::ALIGN != 0 {
                return Err(PlanError::Invalid {
                    section: "weight index",
                    reason: format!("weight `{}` has an inconsistent size or place", w.name),
                });
            }
        }
        let code_index: Vec<CodeEntry> = serde_json::from_slice(section(SectionKind::Kernels))
            .map_err(|e| PlanError::Invalid {
                section: "kernels",
                reason: e.to_string(),
            })?;
        let code_len = section(SectionKind::Code).len();
        for e in &code_index {
            if e.offset.checked_add(e.len).is_none_or(|end| end > code_len)
                || e.offset % plan::ALIGN != 0
            {
                return Err(PlanError::Invalid {
                    section: "kernels",
                    reason: format!("function `{}` lies outside the code section", e.function),
                });
            }
        }
        let cuda: Option<CudaCode> =
            serde_json::from_slice(section(SectionKind::Cuda)).map_err(|e| PlanError::Invalid {
                section: "cuda",
                reason: e.to_string(),
            })?;
        let by_name = weights
            .iter()
            .enumerate()
            .map(|(i, w)| (w.name.clone(), i))
            .collect();
        let weights_start = weights_section.offset as usize;
        Ok(PlanFile {
            map,
            meta,
            graph,
            schedule,
            sections,
            weights,
            by_name,
            weights_start,
            code_index,
            cuda,
        })
    }

    /// Checks that this host can run the plan's CPU code.
    pub fn check_cpu_target(&self) -> Result<(), PlanError> {
        match self.meta.cpu_target() {
            Some(target @ Target::Cpu { arch, features }) => {
                match host_cannot_run(arch, features) {
                    Some(reason) => Err(PlanError::Target {
                        target: target.clone(),
                        reason,
                    }),
                    None => Ok(()),
                }
            }
            _ => Err(PlanError::NoCpuTarget {
                targets: self
                    .meta
                    .targets
                    .iter()
                    .map(|t| match t {
                        Target::Cpu { .. } => "cpu",
                        Target::Cuda { .. } => "cuda",
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            }),
        }
    }

    /// The plan's CUDA module, when it was compiled for CUDA.
    pub fn cuda(&self) -> Option<&CudaCode> {
        self.cuda.as_ref()
    }

    /// The raw weights section (weights lie at their `WeightEntry::offset` in it), for uploading in one copy.
    pub fn weights_bytes(&self) -> &[u8] {
        let e = &self.sections[SectionKind::Weights as usize - 1];
        &self.map[e.offset as usize..(e.offset + e.len) as usize]
    }

    /// Sections as (name, offset, length, checksum), for `kiln inspect`.
    pub fn sections(&self) -> impl Iterator<Item = (&'static str, u64, u64, u64)> + '_ {
        self.sections
            .iter()
            .zip(SectionKind::ALL)
            .map(|(e, k)| (k.name(), e.offset, e.len, e.checksum))
    }

    /// The generated functions the plan carries.
    pub fn code_index(&self) -> &[CodeEntry] {
        &self.code_index
    }

    /// The code section: machine code of every function in `code_index`.
    pub fn code_bytes(&self) -> &[u8] {
        let e = &self.sections[SectionKind::Code as usize - 1];
        &self.map[e.offset as usize..(e.offset + e.len) as usize]
    }

    pub fn weight_entries(&self) -> &[WeightEntry] {
        &self.weights
    }

    pub fn file_size(&self) -> usize {
        self.map.len()
    }
}

impl WeightSource for PlanFile {
    fn weight(&self, name: &str) -> Option<WeightView<'_>> {
        let w = &self.weights[*self.by_name.get(name)?];
        let start = self.weights_start + w.offset;
        Some(WeightView {
            format: w.format,
            layout: w.layout,
            shape: &w.shape,
            data: &self.map[start..start + w.len],
        })
    }
}

/// The target this host can run: its architecture, and the CPU features kiln knows how to use that it has.
pub fn host_target() -> Target {
    Target::Cpu {
        arch: std::env::consts::ARCH.to_string(),
        features: host_features(),
    }
}

fn host_features() -> Vec<String> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut found = Vec::new();
        macro_rules! detect {
            ($($f:tt),*) => { $( if std::arch::is_x86_feature_detected!($f) { found.push($f.to_string()); } )* };
        }
        detect!(
            "sse3",
            "ssse3",
            "sse4.1",
            "sse4.2",
            "popcnt",
            "lzcnt",
            "bmi1",
            "bmi2",
            "cmpxchg16b",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avxvnni",
            "avx512f",
            "avx512dq",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512vbmi",
            "avx512bitalg"
        );
        found
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// Why this host cannot run CPU code for `arch` with `features`, if it cannot.
fn host_cannot_run(arch: &str, features: &[String]) -> Option<String> {
    let host = std::env::consts::ARCH;
    if arch != host {
        return Some(format!("this host is {host}"));
    }
    let have = host_features();
    let missing: Vec<&str> = features
        .iter()
        .filter(|f| !have.contains(f))
        .map(String::as_str)
        .collect();
    (!missing.is_empty()).then(|| format!("this CPU lacks {}", missing.join(", ")))
}

/// Whether anonymous memory may get transparent huge pages: Linux with THP `always` or `madvise`.
fn huge_pages_available() -> bool {
    cfg!(target_os = "linux")
        && std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|mode| mode.contains("[always]") || mode.contains("[madvise]"))
}
