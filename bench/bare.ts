// The peer without vmcgi: the QEMU command vmcgi would run, spawned by hand.
// Every bare QEMU is named vmcgi-bench-PID-N (QEMU's -name), so that the end
// of the run can tell whether one is left, and killed on the way out.

import { spawn, type ChildProcess } from 'node:child_process'
import { performance } from 'node:perf_hooks'
import getPort from 'get-port'
import { buildQemuArgs } from '../src/vm/qemu-args.js'
import type { Guest } from './guests.js'
import { pollUntil200 } from './measure.js'

export interface BareVm {
  child: ChildProcess
  port: number
  exited: Promise<void>
}

/** The -name prefix of this run's bare QEMUs. */
export const bareNamePrefix = `vmcgi-bench-${process.pid}-`
const running = new Set<ChildProcess>()
let spawned = 0

export async function spawnBare(guest: Guest): Promise<BareVm> {
  const port = await getPort({ host: '127.0.0.1' })
  const args = buildQemuArgs({ vm: guest.config.vm, accel: guest.accel.accel, hostPort: port, sandbox: true, name: `${bareNamePrefix}${++spawned}` })
  const child = spawn(guest.config.vm.qemu, args, { stdio: ['pipe', 'ignore', 'ignore'] })
  running.add(child)
  // A QEMU that cannot be started (ENOENT) ends with an error, not an exit.
  const exited = new Promise<void>((done) => {
    const end = () => {
      running.delete(child)
      done()
    }
    child.once('exit', end)
    child.once('error', end)
  })
  return { child, port, exited }
}

export async function killBare(vm: BareVm): Promise<void> {
  vm.child.kill('SIGKILL')
  await vm.exited
}

/** SIGKILL to every bare QEMU still running (on the way out of a failed or interrupted run). */
export function killAllBare(): void {
  for (const child of running) child.kill('SIGKILL')
}

/** Spawn, poll GET / until 200, kill: the time to the 200. */
export async function baselineOnce(guest: Guest): Promise<number> {
  const started = performance.now()
  const vm = await spawnBare(guest)
  try {
    await pollUntil200(vm.port, 'the bare guest')
    return performance.now() - started
  } finally {
    await killBare(vm)
  }
}
