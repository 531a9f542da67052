// Container images as guests, end to end: `npm run images -- --from-image`
// (images/build.sh, then src/image/) turns the test images that
// test/images/build.sh makes from Debian's archive into guests, and the real
// vmcgi CLI serves each with nothing but the vmcgi.json the build wrote.

import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { execa } from 'execa'
import { request } from 'undici'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { spawnVmcgi, type VmcgiProcess } from '../support/vmcgi.js'
import { bootTime, repo } from './harness.js'

const testImages = join(repo, 'images/out/test-images')
const work = mkdtempSync(join(tmpdir(), 'vmcgi-image-e2e-'))
afterAll(() => rmSync(work, { recursive: true, force: true }))

function testImage(name: string): string {
  const path = join(testImages, name)
  if (!existsSync(path)) throw new Error(`no test image ${path}: run \`bash test/images/build.sh\` first`)
  return path
}

/** `npm run images -- --from-image SOURCE --out DIR ...`, as a user runs it. */
async function buildFromImage(source: string, out: string, ...options: string[]) {
  return execa('bash', [join(repo, 'images/build.sh'), '--from-image', source, '--out', out, ...options], {
    reject: false, all: true, timeout: 15 * 60_000,
  })
}

async function buildOrThrow(source: string, name: string, ...options: string[]): Promise<string> {
  const out = join(work, name)
  const result = await buildFromImage(source, out, ...options)
  if (result.exitCode !== 0) throw new Error(`the build of ${source} failed (${result.exitCode}):\n${result.all}`)
  return out
}

/**
 * Serves DIR/vmcgi.json as written by the build, with `use`, then stops vmcgi
 * and checks that no QEMU of it is left. One at a time: every such config
 * has the default admin port.
 */
async function serving(dir: string, use: (vmcgi: VmcgiProcess) => Promise<void>): Promise<void> {
  const vmcgi = await spawnVmcgi(join(dir, 'vmcgi.json'), { listenTimeoutMs: 120_000 })
  try {
    await use(vmcgi)
  } finally {
    expect(await vmcgi.stop()).toEqual([])
  }
}

interface PythonAnswer {
  uid: number
  gid: number
  groups: number[]
  cwd: string
  greeting: string
  hostname: string
  boot_id: string
  import_random: number
  request_random: number
  restores: number
  issue_net_exists: boolean
  opt_cfg: string[]
  hardlink_same_inode: boolean
  written_before: boolean
  argv: string[]
}

describe('a Python image (Debian\'s python3, layers with a whiteout, an opaque directory and a hard link, USER app)', () => {
  let dir: string
  beforeAll(async () => {
    dir = await buildOrThrow(`oci:${testImage('python')}:latest`, 'python')
  }, 20 * 60_000)

  it('writes a config for the x86_64 guest with the image\'s exposed port and a read-only disk', () => {
    const config = JSON.parse(readFileSync(join(dir, 'vmcgi.json'), 'utf8')) as { vm: Record<string, unknown> }
    expect(config.vm).toMatchObject({ qemu: 'qemu-system-x86_64', guestPort: 8080, kernel: 'Image' })
    // Both named for their contents: a vmcgi serving an earlier build keeps its own.
    expect(String(config.vm.initrd)).toMatch(/^initramfs-[0-9a-f]{12}\.cpio\.gz$/)
    expect(String(config.vm.disk)).toMatch(/^root-[0-9a-f]{12}\.erofs$/)
    expect(existsSync(join(dir, String(config.vm.disk)))).toBe(true)
  })

  it('answers from a fresh VM per request, with the app\'s own headers, as the image\'s user, on a fresh file system', () => serving(dir, async (vmcgi) => {
    const answers: { vm: unknown; body: PythonAnswer }[] = []
    for (let i = 0; i < 2; i++) {
      const res = await request(`${vmcgi.url}/hello`)
      expect(res.statusCode).toBe(200)
      expect(res.headers['vmcgi-status']).toBe('OK')
      expect(res.headers['vmcgi-vm-boot-time']).toMatch(bootTime)
      expect(res.headers['x-powered-by']).toBe('python-test-image')
      answers.push({ vm: res.headers['vmcgi-vm-id'], body: await res.body.json() as PythonAnswer })
    }
    const [first, second] = answers as [typeof answers[0], typeof answers[0]]
    expect(first.body).toMatchObject({
      uid: 999, gid: 999, cwd: '/app', greeting: 'hello from the image', hostname: 'vmcgi',
      // The whiteout deleted the file of the lower layer; the opaque directory hid the lower one's entries.
      issue_net_exists: false, opt_cfg: ['c'], hardlink_same_inode: true,
      written_before: false, argv: ['/app/server.py'],
    })
    expect(first.body.groups).toContain(999)
    expect(second.body.written_before).toBe(false)
    expect(second.vm).not.toBe(first.vm)
    expect(second.body.boot_id).not.toBe(first.body.boot_id)
    await expect.poll(vmcgi.qemuChildren, { timeout: 5_000, interval: 50 }).toEqual([])
  }))
})

describe('a static binary image (Debian\'s busybox-static), from both kinds of docker save archive', () => {
  it('serves the Docker 20.10 kind as root, and the Docker 25 kind with --user 1000:1000', async () => {
    const asRoot = await buildOrThrow(`docker-archive:${testImage('docker-archive.tar')}`, 'static-20')
    const asUser = await buildOrThrow(`docker-archive:${testImage('docker-archive-oci.tar')}`, 'static-25', '--user', '1000:1000')
    for (const [dir, uid] of [[asRoot, 0], [asUser, 1000]] as const) {
      await serving(dir, async (vmcgi) => {
        const page = await request(`${vmcgi.url}/`)
        expect(page.statusCode).toBe(200)
        expect(page.headers['vmcgi-status']).toBe('OK')
        expect(await page.body.text()).toMatch(/hello from a static binary/)
        const id = await request(`${vmcgi.url}/cgi-bin/id`)
        expect(id.statusCode).toBe(200)
        expect(await id.body.text()).toMatch(new RegExp(`^uid: ${uid}$`, 'm'))
      })
    }
  }, 10 * 60_000)
})

describe('an image index', () => {
  it('picks this host\'s platform by default and the other with --arch', async () => {
    const source = `oci:${testImage('multi')}`
    const native = await buildOrThrow(source, 'multi-native')
    const arm = await buildOrThrow(source, 'multi-arm', '--arch', 'aarch64')
    const configOf = (dir: string) => (JSON.parse(readFileSync(join(dir, 'vmcgi.json'), 'utf8')) as { vm: { qemu: string } }).vm.qemu
    expect(configOf(native)).toBe(process.arch === 'arm64' ? 'qemu-system-aarch64' : 'qemu-system-x86_64')
    expect(configOf(arm)).toBe('qemu-system-aarch64')
    await serving(arm, async (vmcgi) => {
      const page = await request(`${vmcgi.url}/`)
      expect(page.statusCode).toBe(200)
      expect(page.headers['vmcgi-status']).toBe('OK')
      expect(await page.body.text()).toMatch(/hello from a static binary/)
    })
  }, 10 * 60_000)
})

describe('bad input', () => {
  it('exits 2 naming the problem: no such source, not an image, a platform the image lacks, an unknown user, no command', async () => {
    const notAnImage = join(work, 'not-an-image.tar')
    writeFileSync(notAnImage, 'just some bytes')
    const cases: [string, string[], RegExp][] = [
      [`oci:${join(work, 'missing')}`, [], /^images: from-image: .*does not exist/m],
      ['registry.example/app:1', [], /^images: from-image: .*is not an image source/m],
      [`docker-archive:${notAnImage}`, [], /^images: from-image: .*cannot be read as an image/m],
      [`oci:${testImage('python')}:latest`, ['--arch', 'aarch64'], /^images: arch: the image is for amd64/m],
      [`oci:${testImage('python')}:latest`, ['--user', 'ghost'], /^images: user: the image's \/etc\/passwd has no user "ghost"/m],
      [`oci:${testImage('python')}:latest`, ['--entrypoint', '[]'], /^images: cmd: the image has no command/m],
      [`oci:${testImage('python')}:latest`, ['--restore-signal', 'SIGUSR2'], /^images: restore-signal: is for --clone ready only/m],
      [`oci:${testImage('python')}:latest`, ['--clone', 'ready', '--restore-signal', 'SIGKILL'], /^images: restore-signal: must be one of SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH/m],
    ]
    for (const [source, options, message] of cases) {
      const result = await buildFromImage(source, join(work, 'bad'), ...options)
      expect({ source, options, exitCode: result.exitCode }).toEqual({ source, options, exitCode: 2 })
      expect(result.all).toMatch(message)
    }
  }, 5 * 60_000)

  it('names the port it probed, and shows what the app printed, when nothing listens there', async () => {
    const dir = await buildOrThrow(`oci:${testImage('python')}:latest`, 'wrong-port', '--port', '9999')
    const file = join(dir, 'vmcgi.json')
    const config = JSON.parse(readFileSync(file, 'utf8')) as { readiness: Record<string, unknown> }
    config.readiness.timeoutMs = 20_000 // the test's patience, not the user's
    writeFileSync(file, JSON.stringify(config))
    const result = await execa(process.execPath, [join(repo, 'dist/main.js'), '--config', file, '--port', '0'], { reject: false, all: true, timeout: 120_000 })
    expect(result.exitCode).toBe(2)
    expect(result.all).toMatch(/did not answer GET \/ on guest port 9999/)
    // The console tail in the error: the app says where it listens.
    expect(result.all).toMatch(/python-test-image: listening on 0.0.0.0:8080/)
  }, 5 * 60_000)
})

describe('clone mode for an image: what the app drew at start-up, saved after it answers or before it starts', () => {
  /** Two requests, each answered by a clone of its own; their answers. */
  async function twoClones(dir: string): Promise<PythonAnswer[]> {
    const answers: PythonAnswer[] = []
    await serving(dir, async (vmcgi) => {
      const vms = new Set()
      for (let i = 0; i < 2; i++) {
        const res = await request(`${vmcgi.url}/clone`)
        expect(res.statusCode).toBe(200)
        expect(res.headers['vmcgi-status']).toBe('OK')
        vms.add(res.headers['vmcgi-vm-id'])
        answers.push(await res.body.json() as PythonAnswer)
      }
      expect(vms.size).toBe(2)
      expect(vmcgi.logLines().some((line) => line.msg === 'saved the template')).toBe(true)
    })
    // Every clone starts from the template's file system, as built.
    expect(answers.map((answer) => answer.written_before)).toEqual([false, false])
    return answers
  }

  it('--clone ready: the app\'s start-up randomness, and its generator\'s state, repeat in every clone', async () => {
    const [first, second] = await twoClones(await buildOrThrow(`oci:${testImage('python')}:latest`, 'clone-ready', '--clone', 'ready')) as [PythonAnswer, PythonAnswer]
    expect(second.import_random).toBe(first.import_random)
    // random.random() per request too: Python's generator was seeded before the snapshot.
    expect(second.request_random).toBe(first.request_random)
    expect([first.restores, second.restores]).toEqual([0, 0])
  }, 10 * 60_000)

  it('--clone ready --restore-signal SIGUSR2: each clone\'s app hears of its restore before its request, and draws again', async () => {
    // The test app reseeds its generator and draws its start-up value again on SIGUSR2.
    const dir = await buildOrThrow(`oci:${testImage('python')}:latest`, 'clone-ready-signal', '--clone', 'ready', '--restore-signal', 'SIGUSR2')
    const [first, second] = await twoClones(dir) as [PythonAnswer, PythonAnswer]
    expect([first.restores, second.restores]).toEqual([1, 1])
    expect(second.import_random).not.toBe(first.import_random)
    expect(second.request_random).not.toBe(first.request_random)
  }, 10 * 60_000)

  it('--clone boot: each clone starts the app after its own seed, and nothing repeats', async () => {
    const [first, second] = await twoClones(await buildOrThrow(`oci:${testImage('python')}:latest`, 'clone-boot', '--clone', 'boot')) as [PythonAnswer, PythonAnswer]
    expect(second.import_random).not.toBe(first.import_random)
    expect(second.request_random).not.toBe(first.request_random)
    expect(second.boot_id).not.toBe(first.boot_id)
  }, 10 * 60_000)
})
