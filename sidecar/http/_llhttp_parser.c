/* llhttp's parser (llhttp/llhttp.c, unchanged), built into the wire's module (_wire.c).
 *
 * The one file of the module built for SSE4.2, when sidecar/compiled.py says the building
 * CPU has it (PAKE_LLHTTP_SSE42; GCC): llhttp then checks a header value 16 bytes a step
 * (_mm_cmpestri), where httptools' wheels build its byte-a-step path. GCC's target pragma
 * defines __SSE4_2__ for what follows, which llhttp.c reads. Only this file: the rest of the
 * module, its import above all (which checks the CPU before anything runs), has no
 * instruction a CPU without SSE4.2 lacks. Another compiler or architecture builds the
 * portable path (ARM's NEON path is llhttp's default there).
 */
#if defined(PAKE_LLHTTP_SSE42) && defined(__GNUC__) && !defined(__clang__) \
    && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("sse4.2,popcnt")
#endif

#include "llhttp/llhttp.c"
