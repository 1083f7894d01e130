//! CUDA graphs: stream capture and replay. (Capture is not simulated yet: every stream reports
//! that it is not capturing, and `cuStreamBeginCapture` is not supported, so programs take their
//! uncaptured path.)

use cudarc::driver::sys::CUstream;

use crate::driver::Function;
use crate::stream::Event;

/// `CU_STREAM_CAPTURE_STATUS_NONE`.
pub fn capture_status(_h: CUstream) -> i32 {
    0
}

/// Records an event into a capture instead of a stream; false when `h` is not capturing.
pub fn record_event(_h: CUstream, _ev: &std::sync::Arc<Event>) -> bool {
    false
}

/// Records a launch into a capture; false when `h` is not capturing.
pub fn capture_launch(
    _h: CUstream,
    _f: &std::sync::Arc<Function>,
    _grid: [u32; 3],
    _block: [u32; 3],
    _smem: usize,
    _values: &[Vec<u8>],
) -> bool {
    false
}
