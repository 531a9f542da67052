// Boot off the request path: a pool of pre-booted VMs, and copy-on-write
// clones of a saved template. Real CLI, real QEMU, real guest.

import { createHash } from 'node:crypto'
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { request } from 'undici'
import { afterAll, describe, expect, it, onTestFinished } from 'vitest'
import { execa } from 'execa'
import { allQemuProcesses, bootTime, expectNoVms, mainJs, startVmcgi, testImage, writeConfig, type Vmcgi } from './harness.js'

async function get(vmcgi: Vmcgi, path: string) {
  const res = await request(`${vmcgi.url}${path}`)
  return { status: res.statusCode, headers: res.headers, body: await res.body.text() }
}

/** Waits until the pool holds `count` booted VMs, as its log says. */
async function poolHolds(vmcgi: Vmcgi, count: number): Promise<void> {
  const pooled = () => vmcgi.logLines().filter((line) => line.msg === 'warm VM ready').at(-1)?.pooled
  await expect.poll(pooled, { timeout: 15_000 }).toBe(count)
}

const idOf = (body: string) => /^id: ([0-9a-f]{32})$/m.exec(body)?.[1]
const waitOf = (timing: unknown) => Number(/wait;dur=([\d.]+)/.exec(String(timing))?.[1])

/** The folders of the QMP sockets this vmcgi's QEMUs were given, from its debug log. */
const qmpFoldersOf = (vmcgi: Vmcgi) => [...new Set(vmcgi.logLines()
  .filter((line) => line.msg === 'QEMU spawned')
  .map((line) => /^unix:([^,]+)/.exec(String((line.argv as string[])[(line.argv as string[]).indexOf('-qmp') + 1]))?.[1])
  .filter((path): path is string => path !== undefined)
  .map((path) => dirname(path)))]

/** The template folder this vmcgi made or reused, from its log. */
const templateOf = (vmcgi: Vmcgi) => String(vmcgi.logLines().find((line) => line.msg === 'saved the template' || line.msg === 'reusing the saved template')?.dir)

const snapshotDir = mkdtempSync(join(tmpdir(), 'vmcgi-e2e-snapshots-'))
afterAll(async () => {
  rmSync(snapshotDir, { recursive: true, force: true })
  expect(await allQemuProcesses()).toEqual([])
})

describe('pool mode', () => {
  it('serves from a pre-booted VM with no wait, then boots a replacement', async () => {
    const vmcgi = await startVmcgi({ pool: { size: 2 } })
    await poolHolds(vmcgi, 2)
    const answer = await get(vmcgi, '/cgi-bin/id')
    expect(answer.status).toBe(200)
    expect(answer.headers['vmcgi-status']).toBe('OK')
    expect(answer.headers['vmcgi-vm-boot-time']).toMatch(bootTime)
    expect(answer.headers['server-timing']).toMatch(/^queue;dur=[\d.]+, spawn;dur=[\d.]+, boot;dur=[\d.]+, wait;dur=0\.0, proxy;dur=[\d.]+$/)
    // The used VM is killed and a new one takes its place.
    await poolHolds(vmcgi, 2)
    await expect.poll(vmcgi.qemuChildren).toHaveLength(2)
    await vmcgi.stop()
  })

  it('boots VMs for the requests of a burst larger than the pool, each VM used once', async () => {
    const vmcgi = await startVmcgi({ pool: { size: 1 } })
    await poolHolds(vmcgi, 1)
    const answers = await Promise.all([1, 2, 3].map(() => get(vmcgi, '/cgi-bin/id')))
    expect(answers.map((answer) => answer.status)).toEqual([200, 200, 200])
    expect(new Set(answers.map((answer) => answer.headers['vmcgi-vm-id'])).size).toBe(3)
    expect(new Set(answers.map((answer) => idOf(answer.body))).size).toBe(3)
    const waits = answers.map((answer) => waitOf(answer.headers['server-timing'])).sort((a, b) => a - b)
    expect(waits[0]).toBe(0)
    expect(waits[2]).toBeGreaterThan(0)
    await vmcgi.stop()
  })
})

describe('clone mode', () => {
  let vmcgi: Vmcgi
  afterAll(() => vmcgi?.stop())

  it('serves every request from its own clone, each with a different random id', async () => {
    vmcgi = await startVmcgi({ vm: { snapshot: { enabled: true, dir: snapshotDir } } })
    const [template] = readdirSync(snapshotDir)
    const ram = join(snapshotDir, template!, 'ram')
    const before = createHash('sha256').update(readFileSync(ram)).digest('hex')

    const sequential = [await get(vmcgi, '/cgi-bin/id'), await get(vmcgi, '/cgi-bin/id')]
    const concurrent = await Promise.all([1, 2, 3].map(() => get(vmcgi, '/cgi-bin/id')))
    const answers = [...sequential, ...concurrent]
    expect(answers.every((answer) => answer.status === 200 && answer.headers['vmcgi-status'] === 'OK')).toBe(true)
    const ids = answers.map((answer) => idOf(answer.body))
    expect(ids.every(Boolean)).toBe(true)
    expect(new Set(ids).size).toBe(answers.length)
    await expectNoVms(vmcgi)

    // Clones map the template's RAM privately: it is never written.
    expect(createHash('sha256').update(readFileSync(ram)).digest('hex')).toBe(before)
  })

  it('sets the clone\'s clock to now, not to when the template was saved', async () => {
    const answer = await get(vmcgi, '/')
    const guestDate = Date.parse(String(answer.headers.date))
    expect(Math.abs(guestDate - Date.now())).toBeLessThan(5_000)
  })

  it('round-trips a POST body through a clone', async () => {
    const res = await request(`${vmcgi.url}/cgi-bin/echo`, { method: 'POST', body: 'clone body', headers: { 'content-type': 'text/plain' } })
    expect(res.statusCode).toBe(200)
    expect(await res.body.text()).toMatch(/body:\nclone body$/)
  })
})

describe('clone mode, clients that leave', () => {
  it('kills a clone whose client leaves while it is restored and reseeded, and stays up', async () => {
    // The test guest's slow script keeps the request open whatever the moment
    // of leaving: during the restore, the reseed, the readiness probes.
    const vmcgi = await startVmcgi({ vm: { snapshot: { enabled: true, dir: snapshotDir } } }, testImage())
    for (const delayMs of [0, 30, 120, 250]) {
      const abort = new AbortController()
      const pending = request(`${vmcgi.url}/cgi-bin/slow?5`, { signal: abort.signal }).then((res) => res.body.text()).catch(() => 'aborted')
      await expect.poll(vmcgi.qemuChildren, { interval: 10 }).toHaveLength(1)
      await new Promise((resolve) => setTimeout(resolve, delayMs))
      abort.abort()
      expect(await pending).toBe('aborted')
      await expectNoVms(vmcgi)
    }
    expect(vmcgi.child.exitCode).toBeNull()
    expect((await get(vmcgi, '/cgi-bin/id')).status).toBe(200)
    expect(vmcgi.logLines().filter((line) => line.msg === 'closing after an error')).toEqual([])
    await vmcgi.stop()
  })
})

describe('clone mode without reseeding', () => {
  it('shows why clones are reseeded: without it, clones repeat each other\'s "random" ids', async () => {
    // How much randomness the kernel uses before the request (a fork per
    // readiness probe, say) varies, so not every pair of clones agrees; but
    // among a few, some print the very same id. With reseeding, none do (above).
    const vmcgi = await startVmcgi({ vm: { snapshot: { enabled: true, dir: snapshotDir, reseed: false } } })
    const seen = new Set<string>()
    let repeated = false
    for (let clone = 0; clone < 8 && !repeated; clone++) {
      const id = idOf((await get(vmcgi, '/cgi-bin/id')).body)
      expect(id).toBeTruthy()
      repeated = seen.has(id!)
      seen.add(id!)
    }
    expect(repeated).toBe(true)
    await vmcgi.stop()
  })
})

describe('clones with a pool', () => {
  it('keeps restored clones ready and serves one with no wait', async () => {
    const vmcgi = await startVmcgi({ pool: { size: 1 }, vm: { snapshot: { enabled: true, dir: snapshotDir } } })
    await poolHolds(vmcgi, 1)
    const answers = [await get(vmcgi, '/cgi-bin/id')]
    await expect.poll(() => vmcgi.logLines().filter((line) => line.msg === 'warm VM ready').length, { timeout: 15_000 }).toBe(2)
    answers.push(await get(vmcgi, '/cgi-bin/id'))
    expect(answers.map((answer) => waitOf(answer.headers['server-timing']))).toEqual([0, 0])
    expect(idOf(answers[0]!.body)).not.toBe(idOf(answers[1]!.body))
    await vmcgi.stop()
  })

  it('makes a new template when the VM settings change, and removes the old one, which no vmcgi uses', async () => {
    const before = readdirSync(snapshotDir).filter((name) => /^[0-9a-f]{16}$/.test(name))
    expect(before).toHaveLength(1)
    const vmcgi = await startVmcgi({ vm: { memoryMiB: 96, snapshot: { enabled: true, dir: snapshotDir } } })
    const after = readdirSync(snapshotDir).filter((name) => /^[0-9a-f]{16}$/.test(name))
    expect(after).toHaveLength(1)
    expect(after).not.toEqual(before)
    expect(vmcgi.logLines().filter((line) => line.msg === 'removed a template no vmcgi uses')).toMatchObject([{ dir: join(snapshotDir, before[0]!) }])
    expect((await get(vmcgi, '/cgi-bin/id')).status).toBe(200)
    await vmcgi.stop()
  })
})

describe('templates that cannot be used', () => {
  const settings = { vm: { snapshot: { enabled: true, dir: snapshotDir } } }

  it('makes the template again when one of its files is gone, or does not match its checksum, saying which folder', async () => {
    const first = await startVmcgi(settings)
    await first.stop()
    const template = templateOf(first)
    expect(existsSync(template)).toBe(true)
    rmSync(join(template, 'state'))

    const second = await startVmcgi(settings)
    expect(second.logLines().some((line) => line.msg === 'saved the template')).toBe(true)
    expect((await get(second, '/cgi-bin/id')).status).toBe(200)
    await second.stop()
    expect(readdirSync(template).sort()).toEqual(['manifest.json', 'ram', 'state'])

    // Damaged the way a full disk or a stray write would: QEMU itself would grow
    // the empty RAM file back to zeros, and the clone would not boot.
    truncateSync(join(template, 'ram'), 0)
    writeFileSync(join(template, 'state'), 'not a device state')
    const third = await startVmcgi(settings)
    expect(third.logLines().filter((line) => line.msg === 'the saved template is damaged; making it again')).toMatchObject([{ dir: template }])
    expect(third.logLines().some((line) => line.msg === 'saved the template')).toBe(true)
    expect((await get(third, '/cgi-bin/id')).status).toBe(200)
    await third.stop()
  })

  it('goes on serving clones when the template\'s files are removed while it runs, as a cleaner of temporary folders would', async () => {
    const vmcgi = await startVmcgi(settings)
    const template = templateOf(vmcgi)
    rmSync(join(template, 'state'))
    rmSync(join(template, 'ram'))
    for (let request = 0; request < 2; request++) {
      const answer = await get(vmcgi, '/cgi-bin/id')
      expect(answer.status).toBe(200)
      expect(answer.headers['vmcgi-status']).toBe('OK')
    }
    expect((await get(vmcgi, '/up')).status).toBe(200)
    await vmcgi.stop()
  })

  it('removes the folder of its QMP sockets when it exits', async () => {
    const vmcgi = await startVmcgi(settings)
    expect((await get(vmcgi, '/cgi-bin/id')).status).toBe(200)
    const folders = qmpFoldersOf(vmcgi)
    expect(folders.length).toBeGreaterThan(0)
    await vmcgi.stop()
    expect(folders.filter((folder) => existsSync(folder))).toEqual([])
  })

  it('exits with status 2 naming vm.snapshot.dir when the folder is open to other users', async () => {
    const open = join(snapshotDir, 'open-to-all')
    mkdirSync(open)
    chmodSync(open, 0o777)
    const config = writeConfig({ vm: { snapshot: { enabled: true, dir: open } } })
    const result = await execa('node', [mainJs, '--config', config], { reject: false, timeout: 60_000 })
    expect(result.exitCode).toBe(2)
    expect(result.stderr).toMatch(/^vmcgi: config: vm\.snapshot\.dir: /)
    expect(readdirSync(open)).toEqual([])
    expect(await allQemuProcesses()).toEqual([])
  })

  // A tmpfs of its own, so that it can be filled; mounting one takes root.
  it.skipIf(process.getuid?.() !== 0)('serves clones from a template on a tmpfs that is then filled up: its RAM file has all its room', async () => {
    const mountPoint = mkdtempSync(join(tmpdir(), 'vmcgi-e2e-tmpfs-'))
    await execa('mount', ['-t', 'tmpfs', '-o', 'size=160m,mode=0700', 'tmpfs', mountPoint])
    onTestFinished(async () => {
      await execa('umount', [mountPoint], { reject: false })
      rmSync(mountPoint, { recursive: true, force: true })
    })
    const vmcgi = await startVmcgi({ vm: { snapshot: { enabled: true, dir: mountPoint } } })
    const ram = statSync(join(templateOf(vmcgi), 'ram'))
    expect(ram.blocks * 512).toBeGreaterThanOrEqual(ram.size)
    // What is left goes to a filler file, until the tmpfs is full.
    try {
      for (const chunk = Buffer.alloc(1 << 20, 1); ;) writeFileSync(join(mountPoint, 'filler'), chunk, { flag: 'a' })
    } catch (error) {
      expect((error as NodeJS.ErrnoException).code).toBe('ENOSPC')
    }
    const answers = [await get(vmcgi, '/cgi-bin/id'), await get(vmcgi, '/cgi-bin/id')]
    expect(answers.map((answer) => [answer.status, answer.headers['vmcgi-status']])).toEqual([[200, 'OK'], [200, 'OK']])
    await vmcgi.stop()
  })

  it('exits with status 2 naming vm.snapshot.dir when the template cannot be made there', async () => {
    // A folder inside a file cannot be made, not even by root.
    const file = join(snapshotDir, 'a-file')
    writeFileSync(file, '')
    const config = writeConfig({ vm: { snapshot: { enabled: true, dir: join(file, 'snapshots') } } })
    const result = await execa('node', [mainJs, '--config', config], { reject: false, timeout: 30_000 })
    expect(result.exitCode).toBe(2)
    expect(result.stderr).toMatch(/^vmcgi: config: vm\.snapshot\.dir: cannot make the template there/)
    expect(await allQemuProcesses()).toEqual([])
  })
})
