//! The LUO ioctl argument rules (`luo::ucmd`) against a reference model.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::luo::*;
use crate::uapi::Errno;

use super::image::Cursor;

/// The reference rule for an ioctl argument (see `luo::ucmd`), to check `ucmd::read` against.
fn ucmd_model(arg: &[u8], k: usize, min: usize) -> Result<usize, Errno> {
    if arg.len() < 4 {
        return Err(Errno::EFAULT);
    }
    let size = u32::from_ne_bytes([arg[0], arg[1], arg[2], arg[3]]) as usize;
    if size > arg.len() {
        return Err(Errno::EFAULT);
    }
    if size < min {
        return Err(Errno::EINVAL);
    }
    if size > k && arg[k..size].iter().any(|&b| b != 0) {
        return Err(Errno::E2BIG);
    }
    Ok(size.min(k))
}

fn ucmd_one<T>(arg: &[u8], min: usize)
where
    T: FromBytes + IntoBytes + zerocopy::Immutable,
{
    let k = std::mem::size_of::<T>();
    let got = crate::luo::ucmd::read::<T>(arg, min);
    match (got, ucmd_model(arg, k, min)) {
        (Ok(v), Ok(n)) => {
            let b = v.as_bytes();
            assert_eq!(&b[..n], &arg[..n], "decoded bytes differ from the user's");
            assert!(
                b[n..].iter().all(|&x| x == 0),
                "bytes past size are not zero"
            );
            let mut out = arg.to_vec();
            crate::luo::ucmd::respond(&mut out, &v).expect("respond to a readable argument");
            assert_eq!(&out[..n], &b[..n], "respond did not copy min(size, sizeof)");
            assert_eq!(&out[n..], &arg[n..], "respond wrote past min(size, sizeof)");
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "ucmd::read errno differs from the rule"),
        (a, b) => panic!(
            "ucmd::read gave {:?}, the rule says {:?}",
            a.map(|_| ()),
            b.map(|_| ())
        ),
    }
}

/// `luo::ucmd::read` / `respond` / `decode` for every LUO argument struct, with the minimum
/// size each command uses, checked against the documented rule.
pub fn ucmd(data: &[u8]) {
    let mut c = Cursor::new(data);
    let which = c.u8();
    let cmd = c.u64();
    let arg = c.rest();
    let (ty, nr, clean) = crate::luo::ucmd::decode(cmd);
    assert!(ty <= 0xff && nr <= 0xff);
    assert_eq!(clean, cmd >> 16 == 0);
    match which % 6 {
        0 => ucmd_one::<CreateSession>(arg, 72),
        1 => ucmd_one::<RetrieveSession>(arg, std::mem::size_of::<CreateSession>()),
        2 => ucmd_one::<PreserveFd>(arg, 16),
        3 => ucmd_one::<RetrieveFd>(arg, 16),
        4 => ucmd_one::<SessionFinish>(arg, 8),
        _ => ucmd_one::<SessionGetName>(arg, 8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ucmd_takes_garbage() {
        let inputs: [&[u8]; 4] = [&[], &[0xff; 300], &[0; 5000], b"HOVRDUMP\x01\0\0\0"];
        for i in inputs {
            ucmd(i);
        }
    }
}
