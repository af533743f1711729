/*
 * A C embedder of the worldswitch VMM core.
 *
 * Builds a core at addresses of its own for a PAE host and a long-mode
 * guest, writes the images the testbed boots (core code, hypervisor area,
 * intermediate and hyper table pages) and what it learnt about them into
 * the directory given as the only argument, then checks the rest of the
 * interface: relocation after an HMA move, the VMMSWITCHERDEF and CPUM
 * layout exports, STAM dumps, errors, and a core in pages of its own
 * (scattered table and hypervisor-area pages) handed out through a page
 * provider.
 *
 * Exit status 0 when every check passed; otherwise a message on stderr.
 */
#include "worldswitch.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "embed.c:%d: check failed: %s: ", __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                     \
            fprintf(stderr, " (last error: %s)\n", ws_last_error());          \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

#define OK(call)                                                              \
    do {                                                                      \
        WsStatus st_ = (call);                                                \
        CHECK(st_ == WS_STATUS_OK, "%s -> %d (%s)", #call, (int)st_,          \
              ws_status_message(st_));                                        \
    } while (0)

static char out_dir[4096];

static FILE *open_out(const char *name) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", out_dir, name);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL, "cannot create %s", path);
    return f;
}

static void write_file(const char *name, const void *data, size_t len) {
    FILE *f = open_out(name);
    CHECK(fwrite(data, 1, len, f) == len, "short write to %s", name);
    fclose(f);
}

/* Writes every page of table set `which` to `name` and its addresses to `info`. */
static void write_tables(const WsVmm *vmm, uint32_t which, const char *name,
                         const char *key, FILE *info) {
    size_t count = 0;
    OK(ws_vmm_table_count(vmm, which, &count));
    CHECK(count > 0, "no %s pages", key);
    FILE *f = open_out(name);
    for (size_t i = 0; i < count; i++) {
        WsImage page;
        OK(ws_vmm_table_page(vmm, which, i, &page));
        CHECK(page.len == 4096, "page of %zu bytes", page.len);
        CHECK(fwrite(page.data, 1, page.len, f) == page.len, "short write");
        fprintf(info, "%s 0x%llx\n", key, (unsigned long long)page.phys);
    }
    fclose(f);
}

/* A page provider over malloc'd memory with made-up physical addresses:
 * the code at a fixed address, HMA page i at 0x03000000 - 2 * i pages,
 * each table page 3 pages below the previous one. */
struct pages {
    uint64_t next_table;
    void *blocks[256];
    size_t count;
};

static int32_t give(struct pages *p, size_t pages, uint8_t **map) {
    if (p->count == sizeof p->blocks / sizeof p->blocks[0]) return -1;
    void *mem = calloc(pages, 4096);
    if (mem == NULL) return -2;
    p->blocks[p->count++] = mem;
    *map = mem;
    return 0;
}

static int32_t contiguous(void *ctx, uint32_t purpose, size_t pages, uint64_t *phys,
                          uint8_t **map) {
    *phys = purpose == WS_PURPOSE_CORE_CODE ? 0x02000000u : 0x03000000u;
    return give(ctx, pages, map);
}

static int32_t table_page(void *ctx, uint32_t purpose, uint64_t *phys, uint8_t **map) {
    struct pages *p = ctx;
    (void)purpose;
    *phys = p->next_table;
    p->next_table -= 3 * 4096;
    return give(p, 1, map);
}

static int32_t hma_pages(void *ctx, size_t pages, uint64_t *phys, uint8_t **map) {
    for (size_t i = 0; i < pages; i++) phys[i] = 0x03000000u - 2 * 4096 * (uint64_t)i;
    return give(ctx, pages, map);
}

static void own_pages(const WsConfig *base) {
    struct pages p = {.next_table = 0x04000000u, .count = 0};
    WsPageProvider provider = {
        .ctx = &p, .contiguous = contiguous, .table_page = table_page, .hma = hma_pages};
    WsVmm *vmm = NULL;
    OK(ws_vmm_create(base, &provider, &vmm));
    WsPlacement where;
    OK(ws_vmm_placement(vmm, &where));
    CHECK(where.code_phys == 0x02000000u, "code at 0x%llx", (unsigned long long)where.code_phys);
    CHECK(where.hma_phys == 0x03000000u, "HMA at 0x%llx", (unsigned long long)where.hma_phys);
    WsImage code;
    OK(ws_vmm_core_code(vmm, &code));
    CHECK(code.data == p.blocks[0], "the core code is not in the provider's memory");
    size_t count = 0;
    OK(ws_vmm_hma_page_count(vmm, &count));
    CHECK(count > 2, "%zu HMA pages", count);
    for (size_t i = 0; i < count; i++) {
        WsImage page;
        OK(ws_vmm_hma_page(vmm, i, &page));
        CHECK(page.phys == 0x03000000u - 2 * 4096 * (uint64_t)i, "HMA page %zu at 0x%llx", i,
              (unsigned long long)page.phys);
        CHECK(page.data == (const uint8_t *)p.blocks[1] + 4096 * i, "HMA page %zu not mapped", i);
        CHECK(page.hc == where.hma_hc + 4096 * i, "HMA page %zu HC", i);
    }
    WsImage none;
    CHECK(ws_vmm_hma_page(vmm, count, &none) == WS_STATUS_INVALID_ARGUMENT, "page past the end");
    OK(ws_vmm_table_count(vmm, WS_PURPOSE_TABLES, &count));
    uint64_t previous = 0;
    for (size_t i = 0; i < count; i++) {
        WsImage page;
        OK(ws_vmm_table_page(vmm, WS_PURPOSE_TABLES, i, &page));
        CHECK(i == 0 || page.phys + 3 * 4096 <= previous, "table pages not scattered");
        previous = page.phys;
    }
    uint32_t kind = 0;
    OK(ws_vmm_select(vmm, 0x80010033u, 0x6b0, 0x801, 1, 1, WS_GUEST_AMD64, &kind));
    OK(ws_vmm_activate(vmm, kind));
    OK(ws_vmm_relocate_hma(vmm, 0xb0000000u));
    OK(ws_vmm_destroy(vmm));
    for (size_t i = 0; i < p.count; i++) free(p.blocks[i]);
    /* A provider that refuses is an error, not a crash. */
    p.count = sizeof p.blocks / sizeof p.blocks[0];
    vmm = NULL;
    CHECK(ws_vmm_create(base, &provider, &vmm) == WS_STATUS_PAGES, "refusal not reported");
    CHECK(vmm == NULL, "handle written on failure");
}

static void errors(const WsVmm *vmm) {
    CHECK(ws_vmm_core_code(NULL, NULL) == WS_STATUS_NULL_POINTER, "NULL handle");
    CHECK(ws_vmm_entries(vmm, 99, 0, NULL) == WS_STATUS_INVALID_ARGUMENT, "bad kind");
    CHECK(strstr(ws_last_error(), "99") != NULL, "message names the value: %s", ws_last_error());
    WsEntries e;
    CHECK(ws_vmm_entries(vmm, 6, 7, &e) == WS_STATUS_INVALID_ARGUMENT, "bad VCPU");
    uint32_t kind;
    /* An AMD64 host on a core built for 32-bit hosts. */
    CHECK(ws_vmm_select(vmm, 0x80010033u, 0x6b0, 0xd01, 1, 1, WS_GUEST_AMD64, &kind) ==
              WS_STATUS_SELECT,
          "AMD64 host accepted by a 32-bit core");
    CHECK(ws_vmm_select(vmm, 0x11, 0, 0, 1, 1, WS_GUEST_AMD64, &kind) == WS_STATUS_SELECT,
          "paging off accepted");
    WsPlacement p;
    CHECK(ws_placement_build(0xc0000000u, 0, 0x400000, 0, &p) == WS_STATUS_PLACEMENT,
          "RC base 0 accepted");
    CHECK(strlen(ws_status_message(WS_STATUS_PANIC)) > 0, "no message");
}

int main(int argc, char **argv) {
    CHECK(argc == 2, "usage: embed OUT_DIR");
    snprintf(out_dir, sizeof out_dir, "%s", argv[1]);

    /* A 32-bit (PAE) host core at addresses of our own. */
    WsConfig cfg;
    OK(ws_config_default(32, &cfg));
    OK(ws_placement_build(0xc0800000u, 0x90000000u, 0x00800000u, 0, &cfg.placement));
    WsExtraMapping lapic = {.virt = 0xfee00000u, .phys = 0xfee00000u, .len = 0x1000, .uncached = 1};
    cfg.extra = &lapic;
    cfg.extra_count = 1;
    WsVmm *vmm = NULL;
    OK(ws_vmm_create(&cfg, NULL, &vmm));

    /* CR0 = PE|MP|ET|NE|WP|PG, CR4 = PAE|PGE|..., EFER = SCE|NXE. */
    uint32_t kind = 0;
    OK(ws_vmm_select(vmm, 0x80010033u, 0x6b0, 0x801, 1, 1, WS_GUEST_AMD64, &kind));
    CHECK(kind == 6, "PAE host + long-mode guest chose %u", kind);
    OK(ws_vmm_activate(vmm, kind));

    WsImage code, hma;
    OK(ws_vmm_core_code(vmm, &code));
    OK(ws_vmm_hma(vmm, &hma));
    WsEntries entries;
    OK(ws_vmm_entries(vmm, kind, 1, &entries));
    CHECK(entries.r0_host_to_guest_hc >= code.hc && entries.r0_host_to_guest_hc < code.hc + code.len,
          "entry outside the core code");
    VMMSWITCHERDEF def;
    OK(ws_vmm_switcher_def(vmm, kind, &def));
    CHECK(sizeof def == 104, "VMMSWITCHERDEF is %zu bytes", sizeof def);
    CHECK(def.enm_type == kind, "enmType %u", def.enm_type);
    const uint8_t *sw_code = (const uint8_t *)(uintptr_t)def.pv_code;
    CHECK(sw_code >= code.data && sw_code + def.cb_code <= code.data + code.len,
          "pvCode outside the core code");
    CHECK(code.hc + (uint64_t)(sw_code - code.data) + def.off_r0_host_to_guest ==
              entries.r0_host_to_guest_hc,
          "offR0HostToGuest disagrees with the entry address");
    const uint8_t *fixups = (const uint8_t *)(uintptr_t)def.pv_fixups;
    CHECK(fixups[0] != 0xff, "empty fixup stream");
    CHECK(strlen((const char *)(uintptr_t)def.psz_desc) > 0, "no description");
    WsCpumLayout layout;
    OK(ws_cpum_layout(&layout));
    CHECK(layout.cpumcpu_size == 2624, "CPUMCPU is %u bytes", layout.cpumcpu_size);
    uint32_t ret_code;
    memcpy(&ret_code,
           hma.data + layout.vm_off_cpum + entries.off_cpumcpu + layout.ret_code, 4);
    CHECK(ret_code == 0, "fresh ret_code %u", ret_code);

    write_file("core.bin", code.data, code.len);
    write_file("hma.bin", hma.data, hma.len);
    FILE *info = open_out("info.txt");
    fprintf(info, "kind %u\n", kind);
    fprintf(info, "code_hc 0x%llx\ncode_phys 0x%llx\n", (unsigned long long)code.hc,
            (unsigned long long)code.phys);
    fprintf(info, "hma_hc 0x%llx\nhma_phys 0x%llx\nhma_rc 0x%x\n", (unsigned long long)hma.hc,
            (unsigned long long)hma.phys, hma.rc);
    fprintf(info, "tables_phys 0x%llx\n", (unsigned long long)cfg.placement.tables_phys);
    fprintf(info, "entry 0x%llx\nvm_hc 0x%llx\nvcpu1_arg 0x%x\n",
            (unsigned long long)entries.r0_host_to_guest_hc, (unsigned long long)entries.vm_hc,
            entries.off_cpumcpu);
    size_t hma_count = 0;
    OK(ws_vmm_hma_page_count(vmm, &hma_count));
    for (size_t i = 0; i < hma_count; i++) {
        WsImage page;
        OK(ws_vmm_hma_page(vmm, i, &page));
        CHECK(page.data == hma.data + 4096 * i, "HMA page %zu is not in the image", i);
        fprintf(info, "hma_page 0x%llx\n", (unsigned long long)page.phys);
    }
    write_tables(vmm, WS_PURPOSE_TABLES, "tables.bin", "table", info);
    write_tables(vmm, WS_PURPOSE_HYPER_TABLES, "hyper.bin", "hyper", info);
    fclose(info);

    /* Every STAM format, sized by a first call. */
    static const uint32_t formats[] = {WS_STAM_PRINT, WS_STAM_XML, WS_STAM_PROMETHEUS, WS_STAM_JSON};
    static const char *names[] = {"stam.txt", "stam.xml", "stam.prom", "stam.json"};
    for (size_t i = 0; i < 4; i++) {
        size_t need = 0;
        CHECK(ws_vmm_stam(vmm, formats[i], "/VMM/*", NULL, 0, NULL, 0, &need) ==
                  WS_STATUS_BUFFER_TOO_SMALL,
              "no size query");
        char *buf = malloc(need);
        CHECK(buf != NULL, "out of memory");
        OK(ws_vmm_stam(vmm, formats[i], "/VMM/*", NULL, 0, buf, need, &need));
        CHECK(strstr(buf, "/VMM/Switcher/ToGC") != NULL, "ToGC missing from %s", names[i]);
        write_file(names[i], buf, strlen(buf));
        free(buf);
    }

    /* Move the HMA and back: the entry's RC side moves, the images return. */
    uint8_t *saved = malloc(code.len);
    CHECK(saved != NULL, "out of memory");
    memcpy(saved, code.data, code.len);
    OK(ws_vmm_relocate_hma(vmm, 0xb0000000u));
    WsEntries moved;
    OK(ws_vmm_entries(vmm, kind, 1, &moved));
    CHECK(moved.vm_rc == entries.vm_rc - 0x90000000u + 0xb0000000u, "VM RC 0x%x", moved.vm_rc);
    CHECK(ws_vmm_relocate_hma(vmm, 0) == WS_STATUS_PLACEMENT, "RC 0 accepted");
    CHECK(ws_vmm_relocate_hma(vmm, 0xb0001000u) == WS_STATUS_PLACEMENT, "overlap accepted");
    OK(ws_vmm_relocate_hma(vmm, 0x90000000u));
    OK(ws_vmm_core_code(vmm, &code));
    CHECK(memcmp(saved, code.data, code.len) == 0, "relocating back did not restore the code");
    free(saved);

    errors(vmm);
    own_pages(&cfg);
    OK(ws_vmm_destroy(vmm));
    puts("embed: ok");
    return 0;
}
