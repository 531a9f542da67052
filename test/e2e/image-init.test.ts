// vmcgi's own init for container images (images/image-init.c) on the real
// x86_64 kernel under QEMU, without vmcgi: a hand-made image (busybox on a
// read-only erofs disk) and the tiny initramfs the host tool writes (the
// init, /dev/console, empty directories and the app spec /vmcgi/app).

import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'
import getPort from 'get-port'
import { request } from 'undici'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { repo } from './harness.js'

const out = join(repo, 'images/out/x86_64')
const cache = join(repo, 'images/out/cache')
const applets = ['sh', 'cat', 'cut', 'date', 'env', 'grep', 'hostname', 'httpd', 'id', 'killall', 'ls', 'mount', 'ps', 'sleep', 'touch']

/** The x86_64 guest's static busybox, which initramfs.sh unpacked into the cache. */
function busybox(): string {
  const dir = join(cache, 'busybox')
  const roots = existsSync(dir) ? readdirSync(dir).filter((name) => name.startsWith('root-amd64-')) : []
  for (const root of roots.sort().reverse()) {
    for (const path of ['bin/busybox', 'usr/bin/busybox']) {
      if (existsSync(join(dir, root, path))) return join(dir, root, path)
    }
  }
  throw new Error(`no amd64 busybox in ${dir}: run \`bash images/build.sh --arch x86_64\` first`)
}

/** The kernel's gen_init_cpio, which initramfs.sh built into the cache. */
function genInitCpio(): string {
  const name = existsSync(cache) ? readdirSync(cache).find((entry) => entry.startsWith('gen_init_cpio-')) : undefined
  if (!name) throw new Error(`no gen_init_cpio in ${cache}: run \`bash images/build.sh --arch x86_64\` first`)
  return join(cache, name)
}

const cgi = (body: string) => `#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n${body}\n`

/** The image's files: busybox and its applets, a page, and CGI scripts that report what the app sees. */
function makeRoot(root: string): void {
  mkdirSync(join(root, 'bin'), { recursive: true })
  mkdirSync(join(root, 'www/cgi-bin'), { recursive: true })
  mkdirSync(join(root, 'etc'))
  copyFileSync(busybox(), join(root, 'bin/busybox'))
  chmodSync(join(root, 'bin/busybox'), 0o755)
  for (const applet of applets) symlinkSync('busybox', join(root, 'bin', applet))
  // As in many images: a symlink to a resolver's file that is not there.
  symlinkSync('../run/systemd/resolve/stub-resolv.conf', join(root, 'etc/resolv.conf'))
  writeFileSync(join(root, 'www/index.html'), 'hello from the image\n')
  const scripts: Record<string, string> = {
    info: [
      'echo "id=$(id -u) $(id -g) $(id -G)"',
      'echo "hostname=$(hostname)"',
      'echo "cwd=$(ls -ld /srv/app | cut -c1-10)"',
      'echo "tmp=$(ls -ld /tmp | cut -c1-10) shm=$(ls -ld /dev/shm | cut -c1-10)"',
      'touch /tmp/x && echo "tmp writable"',
      'echo "--- resolv.conf"; cat /etc/resolv.conf',
      'echo "--- hosts"; cat /etc/hosts',
      'echo "--- hostname"; cat /etc/hostname',
      'echo "--- mounts"; mount',
    ].join('\n'),
    date: 'date +%s',
    quit: 'killall httpd',
  }
  for (const [name, body] of Object.entries(scripts)) {
    writeFileSync(join(root, 'www/cgi-bin', name), cgi(body), { mode: 0o755 })
  }
}

/** The host tool's initramfs: the init, the console, the mount points and /vmcgi/app. */
function makeInitramfs(dir: string, spec: string[]): string {
  mkdirSync(dir)
  writeFileSync(join(dir, 'app'), spec.map((entry) => `${entry}\0`).join(''))
  const list = [
    `file /init ${join(out, 'image-init')} 0755 0 0`,
    'dir /dev 0755 0 0',
    'nod /dev/console 0600 0 0 c 5 1',
    ...['/proc', '/sys', '/newroot', '/lower', '/rw', '/vmcgi'].map((d) => `dir ${d} 0755 0 0`),
    `file /vmcgi/app ${join(dir, 'app')} 0644 0 0`,
  ]
  writeFileSync(join(dir, 'list'), `${list.join('\n')}\n`)
  const cpio = execFileSync(genInitCpio(), ['-t', '0', join(dir, 'list')], { maxBuffer: 64 << 20 })
  const file = join(dir, 'initramfs.cpio.gz')
  writeFileSync(file, gzipSync(cpio, { level: 1 }))
  return file
}

interface Guest {
  /** Everything QEMU printed so far (the serial console, then its own errors), without \r. */
  output: () => string
  /** Resolves with the time since the start once the output matches; rejects after ms. */
  waitFor: (pattern: RegExp, ms?: number) => Promise<number>
  /** Writes on the guest's console. */
  send: (text: string) => void
  /** QEMU's exit code, once it exits. */
  exited: Promise<number | null>
  port: number
}

const qemus = new Set<ChildProcess>()

async function boot(initramfs: string, disk: string | undefined): Promise<Guest> {
  const port = await getPort({ host: '127.0.0.1' })
  const args = [
    '-machine', 'microvm,acpi=off,rtc=on', '-accel', 'tcg', '-cpu', 'max', '-m', '256',
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
    '-kernel', join(out, 'Image'), '-initrd', initramfs,
    '-append', 'console=ttyS0 quiet no_timer_check reboot=t', '-serial', 'stdio',
    '-netdev', `user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:${port}-:8080`, '-device', 'virtio-net-device,netdev=net0',
    ...(disk ? ['-drive', `file=${disk},if=none,format=raw,readonly=on,id=root`, '-device', 'virtio-blk-device,drive=root'] : []),
  ]
  const started = performance.now()
  const qemu = spawn('qemu-system-x86_64', args, { stdio: ['pipe', 'pipe', 'pipe'] })
  qemus.add(qemu)
  let text = ''
  const waiters = new Set<() => void>()
  const onData = (chunk: Buffer) => {
    // The serial console ends its lines with \r\n.
    text += chunk.toString('utf8').replace(/\r/g, '')
    for (const check of waiters) check()
  }
  qemu.stdout.on('data', onData)
  qemu.stderr.on('data', onData)
  const exited = new Promise<number | null>((resolve) => qemu.on('exit', (code) => {
    qemus.delete(qemu)
    resolve(code)
    for (const check of waiters) check()
  }))
  const waitFor = (pattern: RegExp, ms = 30_000) => new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => {
      waiters.delete(check)
      reject(new Error(`no ${pattern} on the console within ${ms} ms; it has:\n${text}`))
    }, ms)
    const check = () => {
      if (pattern.test(text)) {
        clearTimeout(timer)
        waiters.delete(check)
        resolve(performance.now() - started)
      } else if (qemu.exitCode !== null || qemu.signalCode !== null) {
        clearTimeout(timer)
        waiters.delete(check)
        reject(new Error(`QEMU exited before ${pattern}; the console has:\n${text}`))
      }
    }
    waiters.add(check)
    check()
  })
  return { output: () => text, waitFor, send: (line) => qemu.stdin.write(line), exited, port }
}

async function get(guest: Guest, path: string): Promise<{ status: number; body: string }> {
  const res = await request(`http://127.0.0.1:${guest.port}${path}`, { headersTimeout: 20_000, bodyTimeout: 20_000 })
  return { status: res.statusCode, body: await res.body.text() }
}

/** The console lines of the init (kernel lines, such as "reboot: Restarting system", left out). */
function initLines(guest: Guest): string[] {
  return guest.output().split('\n').filter((line) => line.startsWith('vmcgi: '))
}

describe('image-init, the PID 1 of a container image, on the x86_64 kernel', () => {
  let dir: string
  let disk: string
  beforeAll(() => {
    if (!existsSync(join(out, 'Image'))) throw new Error(`no x86_64 kernel in ${out}: run \`bash images/build.sh --arch x86_64\` first`)
    try {
      execFileSync('mkfs.erofs', ['--help'], { stdio: 'ignore' })
    } catch {
      throw new Error('mkfs.erofs not found: install erofs-utils (the image group of images/packages.txt)')
    }
    // A no-op when image-init is up to date with its source.
    execFileSync('bash', [join(repo, 'images/image-init.sh'), '--arch', 'x86_64'], { stdio: 'pipe' })
    dir = mkdtempSync(join(tmpdir(), 'vmcgi-image-init-'))
    makeRoot(join(dir, 'root'))
    disk = join(dir, 'root.erofs')
    execFileSync('mkfs.erofs', ['--quiet', '--all-root', disk, join(dir, 'root')])
  })
  afterAll(async () => {
    await Promise.all([...qemus].map((qemu) => new Promise((resolve) => {
      qemu.on('exit', resolve)
      qemu.kill('SIGKILL')
    })))
    if (dir) rmSync(dir, { recursive: true, force: true })
  })

  it('runs the app as its user, says when it listens, reseeds, and ends the VM when the app dies', async () => {
    const initramfs = makeInitramfs(join(dir, 'httpd'), [
      'uid=1000', 'gid=1000', 'groups=1000,27', 'cwd=/srv/app', 'port=8080',
      'env=PATH=/usr/local/bin:/bin', 'env=HOME=/',
      // No slash: found through the app's PATH.
      'arg=httpd', 'arg=-f', 'arg=-p', 'arg=8080', 'arg=-h', 'arg=/www',
    ])
    const guest = await boot(initramfs, disk)
    const ms = await guest.waitFor(/vmcgi: ready\n/)
    console.log(`image-init: "vmcgi: ready" ${Math.round(ms)} ms after QEMU started (TCG)`)
    // The init says nothing else on a normal boot (and the kernel, quiet, nothing at all).
    expect(initLines(guest)).toEqual(['vmcgi: ready'])

    expect(await get(guest, '/')).toEqual({ status: 200, body: 'hello from the image\n' })
    const info = (await get(guest, '/cgi-bin/info')).body
    expect(info).toContain('id=1000 1000 1000 27\n')
    expect(info).toContain('hostname=vmcgi\n')
    expect(info).toContain('cwd=drwxr-xr-x\n')
    expect(info).toContain('tmp=drwxrwxrwt shm=drwxrwxrwt\n')
    expect(info).toContain('tmp writable\n')
    expect(info).toContain('--- resolv.conf\nnameserver 127.0.0.1\n')
    expect(info).toContain('--- hosts\n127.0.0.1 localhost\n10.0.2.15 vmcgi\n')
    expect(info).toContain('--- hostname\nvmcgi\n')
    expect(info).toMatch(/^overlay on \/ type overlay \(rw,.*lowerdir=\/lower,upperdir=\/rw\/upper,workdir=\/rw\/work/m)
    expect(info).toMatch(/^devpts on \/dev\/pts type devpts .*ptmxmode=666/m)

    // What a clone of a snapshot is told before it serves; echo is off.
    guest.send(`vmcgi-seed ${randomBytes(32).toString('hex')} 1700000000 n1\n`)
    await guest.waitFor(/vmcgi: reseeded n1\n/)
    const epoch = Number((await get(guest, '/cgi-bin/date')).body.trim())
    expect(epoch).toBeGreaterThanOrEqual(1_700_000_000)
    expect(epoch).toBeLessThan(1_700_000_060)
    guest.send('vmcgi-seed zz 1700000000 n2\n')
    await guest.waitFor(/vmcgi: reseed failed n2\n/)
    expect(guest.output()).not.toContain('vmcgi-seed')

    // killall sends SIGTERM to every httpd: the app dies, the VM ends.
    await get(guest, '/cgi-bin/quit').catch(() => undefined)
    expect(await guest.exited).toBe(0)
    expect(initLines(guest).at(-1)).toBe('vmcgi: app killed by signal 15')
  })

  it('forwards signals to the app, reaps orphans, takes writes on the overlay, passes exactly the given environment', async () => {
    const script = [
      'echo "cwd=$(pwd) $(env | grep -e ^FOO= -e ^TERM= -e ^HOME=)"',
      'echo written > /bin/new && cat /bin/new',
      // Only stdin, stdout and stderr: none of PID 1's descriptors.
      'echo fds:; ls -1 /proc/$$/fd; echo end',
      // An orphan: its parent exits at once, and PID 1 must reap it.
      'sh -c "sleep 0.2 &"; sleep 1',
      'echo "zombies=$(ps -o stat | grep -c Z)"',
      'trap "echo got TERM; exit 42" TERM',
      // PID 1 forwards what it is sent to the app.
      '(kill -TERM 1) &',
      'while :; do sleep 1 & wait $!; done',
    ].join('\n')
    const initramfs = makeInitramfs(join(dir, 'signals'), [
      'uid=0', 'gid=0', 'groups=', 'cwd=/var/lib/app', 'port=8080', 'env=PATH=/bin', 'env=FOO=bar baz', `arg=/bin/sh`, 'arg=-c', `arg=${script}`,
    ])
    const guest = await boot(initramfs, disk)
    expect(await guest.exited).toBe(0)
    const text = guest.output()
    // FOO from the spec; not HOME=/ nor TERM=linux, which the kernel gives PID 1.
    expect(text).toMatch(/^cwd=\/var\/lib\/app FOO=bar baz$/m)
    expect(text).toContain('written\n')
    expect(text).toContain('fds:\n0\n1\n2\nend\n')
    expect(text).toContain('zombies=0\n')
    expect(text).toContain('got TERM\n')
    expect(initLines(guest).at(-1)).toBe('vmcgi: app exited with status 42')
  })

  it('sends the restore signal to the app at a clone\'s seed, not at the seed before a template is saved', async () => {
    const script = [
      'trap "echo app: restored; exit 0" USR2',
      'echo app: listening for USR2',
      'while :; do sleep 1 & wait $!; done',
    ].join('\n')
    const initramfs = makeInitramfs(join(dir, 'restore'), [
      'uid=0', 'gid=0', 'groups=', 'cwd=/', 'port=8080', 'restore-signal=12', 'env=PATH=/bin', 'arg=/bin/sh', 'arg=-c', `arg=${script}`,
    ])
    const guest = await boot(initramfs, disk)
    await guest.waitFor(/app: listening for USR2\n/)
    const seed = () => randomBytes(32).toString('hex')
    // A template's seed: the app, which exits on its first USR2, is not told.
    guest.send(`vmcgi-seed ${seed()} 1700000000 t1 save\n`)
    await guest.waitFor(/vmcgi: reseeded t1\n/)
    // A clone's seed: the app is told, and exits.
    guest.send(`vmcgi-seed ${seed()} 1700000000 c1\n`)
    expect(await guest.exited).toBe(0)
    expect(guest.output().match(/app: restored/g)).toEqual(['app: restored'])
    expect(initLines(guest)).toEqual(['vmcgi: reseeded t1', 'vmcgi: reseeded c1', 'vmcgi: app exited with status 0'])
  })

  it('reports a program that cannot be run, and the VM ends', async () => {
    const initramfs = makeInitramfs(join(dir, 'missing'), [
      'uid=1000', 'gid=1000', 'groups=', 'cwd=/', 'port=8080', 'env=PATH=/usr/bin:/bin', 'arg=no-such-program',
    ])
    const guest = await boot(initramfs, disk)
    expect(await guest.exited).toBe(0)
    expect(initLines(guest)).toEqual([
      'vmcgi: init failed: exec no-such-program: No such file or directory',
      'vmcgi: app exited with status 127',
    ])
  })

  it('reports its own failure, and the VM ends', async () => {
    const initramfs = makeInitramfs(join(dir, 'no-disk'), ['uid=0', 'gid=0', 'groups=', 'cwd=/', 'port=8080', 'arg=/bin/sh'])
    const guest = await boot(initramfs, undefined)
    expect(await guest.exited).toBe(0)
    expect(initLines(guest)).toEqual(['vmcgi: init failed: mount erofs on /lower: No such file or directory'])
  })
})
