//! Generated machine code mapped executable: the plan's code section copied into fresh pages, which are then made
//! read-only and executable (never writable and executable at once).

use kiln_ir::cpu_abi::CpuFunction;
use kiln_ir::plan::CodeEntry;
use std::collections::HashMap;

/// Every generated function takes one pointer to its argument block (`kiln_ir::cpu_abi`).
pub type KernelFn = unsafe extern "C" fn(args: *const u8);

pub struct NativeCode {
    base: *mut u8,
    len: usize,
    functions: HashMap<CpuFunction, usize>,
}

// SAFETY: the pages are immutable after `load`; calling into them from several threads is what they are for.
unsafe impl Send for NativeCode {}
unsafe impl Sync for NativeCode {}

impl NativeCode {
    /// Maps `code` executable. `index` must lie inside `code` (the plan loader checks it).
    pub fn load(index: &[CodeEntry], code: &[u8]) -> std::io::Result<Self> {
        let functions = index
            .iter()
            .map(|e| (e.function.clone(), e.offset))
            .collect();
        if code.is_empty() {
            return Ok(NativeCode {
                base: std::ptr::null_mut(),
                len: 0,
                functions,
            });
        }
        let len = code.len();
        // SAFETY: a fresh private anonymous mapping, written only here before it becomes executable.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            std::ptr::copy_nonoverlapping(code.as_ptr(), base as *mut u8, len);
            if libc::mprotect(base, len, libc::PROT_READ | libc::PROT_EXEC) != 0 {
                let err = std::io::Error::last_os_error();
                libc::munmap(base, len);
                return Err(err);
            }
            Ok(NativeCode {
                base: base as *mut u8,
                len,
                functions,
            })
        }
    }

    pub fn get(&self, function: &CpuFunction) -> Option<KernelFn> {
        let offset = *self.functions.get(function)?;
        // SAFETY: `offset` is the start of a function Cranelift compiled with this signature.
        Some(unsafe { std::mem::transmute::<*mut u8, KernelFn>(self.base.add(offset)) })
    }
}

impl Drop for NativeCode {
    fn drop(&mut self) {
        if !self.base.is_null() {
            // SAFETY: the mapping made in `load`, no longer referenced (functions borrow `self`).
            unsafe {
                libc::munmap(self.base as *mut libc::c_void, self.len);
            }
        }
    }
}
