//! Module images as the driver gets them from `cuModuleLoadData`: PTX text or an ELF cubin. What
//! the simulator reads from them, per kernel (`.entry`): its parameter list (offset and size of
//! each parameter — the PTX `.param` declarations, or the cubin's `EIATTR_KPARAM_INFO`
//! attributes), its static shared memory, its register count (cubin) and its launch bounds; and of
//! the image, the architecture and the CUDA version it needs. A launch's `kernelParams` are read
//! with this parameter list, as the real driver does.

use std::collections::HashMap;

/// One parameter of a kernel, as the image declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    pub offset: usize,
    pub size: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Entry {
    pub name: String,
    pub params: Vec<Param>,
    pub static_smem: usize,
    /// 0 when the image does not say (PTX: the JIT decides).
    pub registers: usize,
    /// From `__launch_bounds__` (`.maxntid` / `EIATTR_MAX_THREADS`), 0 = none.
    pub max_threads: usize,
}

#[derive(Clone, Debug)]
pub enum Format {
    Ptx { isa: (u32, u32), target: u32 },
    Cubin { arch: u32, api_version: u32 },
}

#[derive(Clone, Debug)]
pub struct Image {
    pub format: Format,
    pub entries: HashMap<String, Entry>,
}

/// The CUDA version (e.g. 13000) a driver needs for PTX ISA `major.minor`.
pub fn cuda_for_ptx_isa((major, minor): (u32, u32)) -> i32 {
    match major {
        0..=7 => 11000,
        8 => match minor {
            0..=5 => 12000 + 10 * minor as i32,
            6 => 12070,
            7 => 12080,
            _ => 12090,
        },
        m => 13000 + 1000 * (m as i32 - 9) + 10 * minor as i32,
    }
}

/// Reads a module image: `bytes` starts with the ELF magic (a cubin) or is PTX text.
pub fn parse(bytes: &[u8]) -> Result<Image, String> {
    if bytes.starts_with(b"\x7fELF") {
        parse_cubin(bytes)
    } else if bytes.len() >= 4 && u32::from_le_bytes(bytes[..4].try_into().unwrap()) == 0xba55ed50 {
        Err("a fatbinary image: the simulator loads PTX and cubins only".into())
    } else {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| "the image is neither ELF nor UTF-8 PTX text".to_string())?;
        parse_ptx(text)
    }
}

/// The length of the image at `p`: the ELF's extent, or the PTX text up to its NUL.
///
/// # Safety
/// `p` must point at a readable image (as `cuModuleLoadData` requires).
pub unsafe fn image_len(p: *const u8) -> usize {
    let head = std::slice::from_raw_parts(p, 4);
    if head == b"\x7fELF" {
        let hdr = std::slice::from_raw_parts(p, 64);
        let shoff = u64::from_le_bytes(hdr[0x28..0x30].try_into().unwrap()) as usize;
        let shentsize = u16::from_le_bytes(hdr[0x3a..0x3c].try_into().unwrap()) as usize;
        let shnum = u16::from_le_bytes(hdr[0x3c..0x3e].try_into().unwrap()) as usize;
        let mut end = shoff + shentsize * shnum;
        for i in 0..shnum {
            let sh = std::slice::from_raw_parts(p.add(shoff + i * shentsize), shentsize);
            let typ = u32::from_le_bytes(sh[4..8].try_into().unwrap());
            let off = u64::from_le_bytes(sh[0x18..0x20].try_into().unwrap()) as usize;
            let size = u64::from_le_bytes(sh[0x20..0x28].try_into().unwrap()) as usize;
            if typ != 8 {
                end = end.max(off + size);
            }
        }
        end
    } else {
        std::ffi::CStr::from_ptr(p.cast()).to_bytes().len()
    }
}

fn parse_ptx(text: &str) -> Result<Image, String> {
    let mut isa = None;
    let mut target = None;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix(".version ") {
            let (a, b) = v.trim().split_once('.').ok_or("bad .version line")?;
            isa = Some((
                a.parse().map_err(|_| "bad .version")?,
                b.trim().parse().map_err(|_| "bad .version")?,
            ));
        } else if let Some(t) = line.strip_prefix(".target ") {
            let t = t.split(',').next().unwrap_or("").trim();
            let digits: String = t
                .trim_start_matches("sm_")
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            target = digits.parse().ok();
        }
        if isa.is_some() && target.is_some() {
            break;
        }
    }
    let isa = isa.ok_or("PTX without a .version directive")?;
    let target = target.ok_or("PTX without a .target directive")?;
    let mut entries = HashMap::new();
    let mut rest = text;
    while let Some(i) = rest.find(".entry ") {
        let after = &rest[i + ".entry ".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '$')
            .collect();
        let open = after
            .find('(')
            .ok_or_else(|| format!("PTX .entry {name}: no parameter list"))?;
        let close = open
            + after[open..]
                .find(')')
                .ok_or_else(|| format!("PTX .entry {name}: unterminated parameter list"))?;
        let mut params = Vec::new();
        let mut offset = 0usize;
        for decl in after[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
        {
            let words: Vec<&str> = decl.split_whitespace().collect();
            let align = words
                .iter()
                .position(|w| *w == ".align")
                .and_then(|k| words.get(k + 1))
                .and_then(|a| a.parse::<usize>().ok());
            let (size, natural) = if let Some(b) = words.iter().position(|w| *w == ".b8") {
                let d = words
                    .get(b + 1)
                    .ok_or_else(|| format!("PTX .entry {name}: bad parameter {decl:?}"))?;
                let n: usize = d
                    .split('[')
                    .nth(1)
                    .and_then(|x| x.trim_end_matches(']').parse().ok())
                    .ok_or_else(|| format!("PTX .entry {name}: bad array parameter {decl:?}"))?;
                (n, 1)
            } else {
                let ty = words
                    .iter()
                    .find(|w| {
                        w.len() > 2
                            && w.starts_with('.')
                            && w[1..].chars().next().is_some_and(|c| "usbf".contains(c))
                            && w[2..].chars().all(|c| c.is_ascii_digit())
                    })
                    .ok_or_else(|| format!("PTX .entry {name}: no type in parameter {decl:?}"))?;
                let bits: usize = ty[2..]
                    .parse()
                    .map_err(|_| format!("PTX .entry {name}: bad type {ty}"))?;
                (bits / 8, bits / 8)
            };
            // Pointer parameters carry `.ptr .align N` of their pointee: that is not the
            // parameter's own alignment.
            let own_align = if words.contains(&".ptr") {
                natural
            } else {
                align.unwrap_or(natural)
            };
            offset = offset.div_ceil(own_align.max(1)) * own_align.max(1);
            params.push(Param { offset, size });
            offset += size;
        }
        // Directives between the list and the body, then the body up to its closing brace.
        let body_start = close + after[close..].find('{').unwrap_or(0);
        let head = &after[close..body_start];
        let max_threads = head
            .split(".maxntid")
            .nth(1)
            .map(|v| {
                v.split(['\n', '.', '{'])
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .filter_map(|x| x.trim().parse::<usize>().ok())
                    .product()
            })
            .unwrap_or(0);
        let mut depth = 0usize;
        let mut body_end = after.len();
        for (j, c) in after[body_start..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        body_end = body_start + j;
                        break;
                    }
                }
                _ => {}
            }
        }
        let body = &after[body_start..body_end];
        let mut static_smem = 0usize;
        for line in body.lines().map(str::trim) {
            if line.starts_with(".shared") && !line.contains(".extern") {
                if let Some(n) = line
                    .split('[')
                    .nth(1)
                    .and_then(|x| x.split(']').next())
                    .and_then(|x| x.parse::<usize>().ok())
                {
                    static_smem += n;
                }
            }
        }
        entries.insert(
            name.clone(),
            Entry {
                name,
                params,
                static_smem,
                registers: 0,
                max_threads,
            },
        );
        rest = &after[body_end.min(after.len())..];
    }
    Ok(Image {
        format: Format::Ptx { isa, target },
        entries,
    })
}

struct Section<'a> {
    name: String,
    typ: u32,
    data: &'a [u8],
    size: usize,
    link: u32,
}

fn rd16(b: &[u8], o: usize) -> Result<u16, String> {
    b.get(o..o + 2)
        .map(|x| u16::from_le_bytes(x.try_into().unwrap()))
        .ok_or_else(|| "cubin truncated".into())
}
fn rd32(b: &[u8], o: usize) -> Result<u32, String> {
    b.get(o..o + 4)
        .map(|x| u32::from_le_bytes(x.try_into().unwrap()))
        .ok_or_else(|| "cubin truncated".into())
}
fn rd64(b: &[u8], o: usize) -> Result<u64, String> {
    b.get(o..o + 8)
        .map(|x| u64::from_le_bytes(x.try_into().unwrap()))
        .ok_or_else(|| "cubin truncated".into())
}

const EIATTR_MAX_THREADS: u8 = 0x05;
const EIATTR_KPARAM_INFO: u8 = 0x17;
const EIATTR_REGCOUNT: u8 = 0x2f;
const EIATTR_CUDA_API_VERSION: u8 = 0x37;

/// The attributes of an `.nv.info` section: (attribute, payload). Formats: 1 = no value,
/// 2 = one byte, 3 = a 16-bit value, 4 = a 16-bit size and that many bytes.
fn nv_info(data: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut o = 0;
    while o + 2 <= data.len() {
        let fmt = data[o];
        let attr = data[o + 1];
        match fmt {
            1 => {
                out.push((attr, Vec::new()));
                o += 2;
            }
            2 | 3 => {
                out.push((
                    attr,
                    data.get(o + 2..o + 4)
                        .ok_or("cubin .nv.info truncated")?
                        .to_vec(),
                ));
                o += 4;
            }
            4 => {
                let n = rd16(data, o + 2)? as usize;
                out.push((
                    attr,
                    data.get(o + 4..o + 4 + n)
                        .ok_or("cubin .nv.info truncated")?
                        .to_vec(),
                ));
                o += 4 + n;
            }
            other => return Err(format!("cubin .nv.info: unknown attribute format {other}")),
        }
    }
    Ok(out)
}

fn parse_cubin(b: &[u8]) -> Result<Image, String> {
    if b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Err("cubin is not a little-endian ELF64 file".into());
    }
    let e_flags = rd32(b, 0x30)?;
    let shoff = rd64(b, 0x28)? as usize;
    let shentsize = rd16(b, 0x3a)? as usize;
    let shnum = rd16(b, 0x3c)? as usize;
    let shstrndx = rd16(b, 0x3e)? as usize;
    let mut raw = Vec::new();
    for i in 0..shnum {
        let o = shoff + i * shentsize;
        let name = rd32(b, o)?;
        let typ = rd32(b, o + 4)?;
        let off = rd64(b, o + 0x18)? as usize;
        let size = rd64(b, o + 0x20)? as usize;
        let link = rd32(b, o + 0x28)?;
        let info = rd32(b, o + 0x2c)?;
        raw.push((name, typ, off, size, link, info));
    }
    let strtab = raw.get(shstrndx).ok_or("cubin: no section name table")?;
    let names = b
        .get(strtab.2..strtab.2 + strtab.3)
        .ok_or("cubin truncated")?;
    let cstr = |tab: &[u8], at: usize| -> String {
        tab.get(at..)
            .map(|t| {
                String::from_utf8_lossy(&t[..t.iter().position(|&c| c == 0).unwrap_or(t.len())])
                    .into_owned()
            })
            .unwrap_or_default()
    };
    let mut sections = Vec::new();
    for &(name, typ, off, size, link, _info) in &raw {
        let data = if typ == 8 {
            &[][..]
        } else {
            b.get(off..off + size).ok_or("cubin truncated")?
        };
        sections.push(Section {
            name: cstr(names, name as usize),
            typ,
            data,
            size,
            link,
        });
    }
    // Symbol names (for the global .nv.info's per-kernel attributes).
    let mut symbols: Vec<String> = Vec::new();
    if let Some(symtab) = sections.iter().find(|s| s.typ == 2) {
        let strs = sections
            .get(symtab.link as usize)
            .map(|s| s.data)
            .unwrap_or(&[]);
        for k in 0..symtab.data.len() / 24 {
            symbols.push(cstr(strs, rd32(symtab.data, k * 24)? as usize));
        }
    }
    let mut entries: HashMap<String, Entry> = HashMap::new();
    let mut api_version = 0;
    for s in &sections {
        if let Some(k) = s.name.strip_prefix(".nv.info.") {
            let mut e = Entry {
                name: k.to_string(),
                ..Default::default()
            };
            for (attr, payload) in nv_info(s.data)? {
                match attr {
                    EIATTR_KPARAM_INFO if payload.len() >= 12 => {
                        let ordinal = rd16(&payload, 4)? as usize;
                        let offset = rd16(&payload, 6)? as usize;
                        let size = ((rd32(&payload, 8)? >> 18) & 0x3fff) as usize;
                        if e.params.len() <= ordinal {
                            e.params.resize(ordinal + 1, Param { offset: 0, size: 0 });
                        }
                        e.params[ordinal] = Param { offset, size };
                    }
                    EIATTR_MAX_THREADS if payload.len() >= 12 => {
                        e.max_threads =
                            (rd32(&payload, 0)? * rd32(&payload, 4)? * rd32(&payload, 8)?) as usize;
                    }
                    EIATTR_CUDA_API_VERSION if payload.len() >= 4 => {
                        api_version = rd32(&payload, 0)?
                    }
                    _ => {}
                }
            }
            entries.insert(k.to_string(), e);
        }
    }
    for s in &sections {
        if s.name == ".nv.info" {
            for (attr, payload) in nv_info(s.data)? {
                if attr == EIATTR_REGCOUNT && payload.len() >= 8 {
                    let sym = rd32(&payload, 0)? as usize;
                    if let Some(e) = symbols.get(sym).and_then(|n| entries.get_mut(n)) {
                        e.registers = rd32(&payload, 4)? as usize;
                    }
                }
            }
        } else if let Some(k) = s.name.strip_prefix(".nv.shared.") {
            if let Some(e) = entries.get_mut(k) {
                e.static_smem = s.size;
            }
        }
    }
    // Only kernels with code are entries.
    entries.retain(|k, _| sections.iter().any(|s| s.name == format!(".text.{k}")));
    Ok(Image {
        format: Format::Cubin {
            arch: (e_flags >> 8) & 0xff,
            api_version,
        },
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX: &str = r#"
.version 9.0
.target sm_80
.address_size 64
.visible .entry k1(
	.param .align 8 .b8 k1_param_0[24],
	.param .u64 .ptr .align 1 k1_param_1,
	.param .u32 k1_param_2
)
.maxntid 128, 1, 1
{
	.shared .align 4 .b8 scratch[128];
	ret;
}
.visible .entry k2()
{
	ret;
}
"#;

    #[test]
    fn ptx_entries_parameters_and_bounds() {
        let img = parse(PTX.as_bytes()).unwrap();
        match img.format {
            Format::Ptx { isa, target } => {
                assert_eq!(isa, (9, 0));
                assert_eq!(target, 80);
            }
            _ => panic!("not PTX"),
        }
        let k1 = &img.entries["k1"];
        assert_eq!(
            k1.params,
            vec![
                Param {
                    offset: 0,
                    size: 24
                },
                Param {
                    offset: 24,
                    size: 8
                },
                Param {
                    offset: 32,
                    size: 4
                }
            ]
        );
        assert_eq!(k1.max_threads, 128);
        assert_eq!(k1.static_smem, 128);
        assert!(img.entries["k2"].params.is_empty());
    }

    #[test]
    fn ptx_isa_versions_map_to_driver_versions() {
        assert_eq!(cuda_for_ptx_isa((9, 0)), 13000);
        assert_eq!(cuda_for_ptx_isa((8, 7)), 12080);
        assert_eq!(cuda_for_ptx_isa((8, 0)), 12000);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse(b"\x7fELF\x02\x01 short").is_err());
        assert!(parse(&[0xff, 0xfe, 0x00]).is_err());
        assert!(parse(b".version 9.0\n").is_err());
    }
}
