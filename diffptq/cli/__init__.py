"""The command line: the parser and value types (parser), the common flags and the run (common), the quantization /
calibration / TDQ flags and their mapping to configs (flags). Light: no torch until a run starts."""
from diffptq.cli.common import (
    REPO_ROOT,
    Run,
    add_common_args,
    check_output_dir,
    check_output_file,
    file_sha256,
    finish_run,
    package_versions,
    resolve_device,
    resolve_dtype,
    run_main,
    start_run,
)
from diffptq.cli.flags import (
    add_blocks_arg,
    add_calib_args,
    add_guidance_arg,
    add_rotation_args,
    add_tdq_args,
    add_weight_args,
    calib_config,
    check_rotation_flags,
    sequential_config,
    tdq_config,
)
from diffptq.cli.parser import (
    ArgumentParser,
    bits_list_value,
    bits_value,
    blocks_value,
    damp_value,
    device_value,
    guidance_value,
    methods_value,
    non_negative_int,
    peers_value,
    positive_float,
    positive_int,
    prompt_file,
    seed_value,
)

__all__ = ["REPO_ROOT", "ArgumentParser", "Run", "add_blocks_arg", "add_calib_args", "add_common_args",
           "add_guidance_arg", "add_rotation_args", "add_tdq_args", "add_weight_args", "bits_list_value", "bits_value",
           "blocks_value",
           "calib_config", "check_output_dir", "check_output_file", "check_rotation_flags", "damp_value",
           "device_value", "file_sha256", "finish_run", "guidance_value", "methods_value", "non_negative_int",
           "package_versions", "peers_value",
           "positive_float", "positive_int", "prompt_file", "resolve_device", "resolve_dtype", "run_main", "seed_value",
           "sequential_config", "start_run", "tdq_config"]
