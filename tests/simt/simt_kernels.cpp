// The production kernel bodies under the host SIMT layer.
#define DROPIT_SIMT_HOST 1
#define DROPIT_KERNEL_NS kernels
#define DROPIT_TEST_DROP_BARRIER 0
#define SIMT_PACK_FN pack_kernels
#define SIMT_UNPACK_FN unpack_kernels
#include "simt_variant.inc"
