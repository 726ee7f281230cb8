import numpy as np
import numpy.typing as npt

def deadband(
    tags: npt.NDArray[np.int32],
    ts: npt.NDArray[np.int64],
    values: npt.NDArray[np.float64],
    quality: npt.NDArray[np.uint32],
    enabled: npt.NDArray[np.uint8],
    dead: npt.NDArray[np.float64],
    max_silence: npt.NDArray[np.int64],
    ref_value: npt.NDArray[np.float64],
    ref_ts: npt.NDArray[np.int64],
    ref_quality: npt.NDArray[np.uint32],
    has_ref: npt.NDArray[np.uint8],
) -> npt.NDArray[np.uint8]: ...
