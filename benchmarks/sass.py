"""The SASS of one kernel instantiation, on a machine without a GPU: NVRTC's PTX for sm_90,
assembled by ptxas, disassembled by nvdisasm. Prints ptxas's register / spill line and the
counts of global loads and tensor-core instructions, and writes the SASS to --out; read the
order of the LDG and HMMA lines to see how many loads a loop keeps in flight.

Needs ptxas (a CUDA toolkit: --ptxas, default /usr/local/cuda*/bin/ptxas, else on PATH) and
nvdisasm (the toolkit's, or `pip install nvidia-cuda-nvdisasm`). When ptxas is older than
NVRTC, the PTX's .version line is lowered to --ptx-version (ptxas refuses a newer one).
Usage: sass.py syncfree.cu "syncfree_stream<__nv_bfloat16,__nv_bfloat16,true,2>" [-DNAME=VALUE ...]
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from cupy_backends.cuda.libs import nvrtc

from zeromoe_cupy._compile import NVRTC_OPTIONS, kernel_source


def find_tool(name, given):
    if given:
        return given
    # a toolkit's first (its include directory serves NVRTC), then PATH
    found = next(iter(sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"))), None) or \
        shutil.which(name)
    if found is None and name == "nvdisasm":  # the pip wheel's copy
        found = next(iter(glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages",
                                                 "nvidia", "cu*", "bin", "nvdisasm"))), None)
    if found is None:
        sys.exit(f"sass.py: {name} not found (pass --{name})")
    return found


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("file", help="a file under zeromoe_cupy/kernels, e.g. fp8.cu")
parser.add_argument("expression", help="the kernel instantiation, as the package names it")
parser.add_argument("--arch", default="sm_90")
parser.add_argument("--ptxas")
parser.add_argument("--nvdisasm")
parser.add_argument("--ptx-version", default="9.0")
parser.add_argument("--out", default="kernel.sass")
args, defines = parser.parse_known_args()  # the rest: -D options for NVRTC
bad = [d for d in defines if not d.startswith("-D")]
if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (extra NVRTC options: -DNAME=VALUE)")
ptxas, nvdisasm = find_tool("ptxas", args.ptxas), find_tool("nvdisasm", args.nvdisasm)
include = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(ptxas))), "include")
options = list(NVRTC_OPTIONS) + [f"-arch=compute_{args.arch[3:]}", f"-I{include}"] + defines
program = nvrtc.createProgram(kernel_source(args.file), args.file, [], [])
nvrtc.addNameExpression(program, args.expression)
try:
    nvrtc.compileProgram(program, options)
except nvrtc.NVRTCError:
    sys.exit(nvrtc.getProgramLog(program))
name = nvrtc.getLoweredName(program, args.expression)
ptx = nvrtc.getPTX(program)
ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
ptx = re.sub(r"^\.version \S+", f".version {args.ptx_version}", ptx, count=1, flags=re.M)
with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "k.ptx"), "w") as f:
        f.write(ptx.rstrip("\x00"))
    cubin = os.path.join(tmp, "k.cubin")
    info = subprocess.run([ptxas, f"-arch={args.arch}", "-v", f.name, "-o", cubin],
                          capture_output=True, text=True)
    if info.returncode:
        sys.exit(info.stderr)
    sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True,
                          check=True).stdout
block = info.stderr.split(f"Compiling entry function '{name}'")[1]
print(next(line.strip() for line in block.splitlines() if "Used" in line))
lines = sass.split(f"\n{name}:\n")[1]
lines = re.split(r"\n[A-Za-z_][A-Za-z_0-9]*:\n", lines)[0]  # up to the next function
with open(args.out, "w") as f:
    f.write(lines)
print(f"{name}: {lines.count('LDG')} global loads, "
      f"{len(re.findall(r'[HQI]MMA|HGMMA|QGMMA', lines))} tensor-core instructions; SASS in "
      f"{args.out}")
