#!/usr/bin/env node
// The CLI: read the config, look at the host, build the server, listen, and
// close on SIGTERM or SIGINT. A wrong config or flag exits with status 2.

import { parseArgs } from 'node:util'
import closeWithGrace from 'close-with-grace'
import { pino } from 'pino'
import { loadConfig, type Overrides } from './config.js'
import { ConfigError } from './errors.js'
import { buildAdminServer } from './admin.js'
import { Metrics } from './metrics.js'
import { buildServer } from './server.js'
import { preflightBoot, probeHost, type HostProbe } from './vm/host.js'
import { prepareClones } from './vm/snapshot.js'
import { createQemuVmFactory } from './vm/vm.js'

const usage = 'usage: vmcgi --config FILE [--host ADDR] [--port N]'

function parseCli(argv: string[]): { configFile: string; overrides: Overrides } {
  let parsed
  try {
    parsed = parseArgs({
      args: argv,
      options: {
        config: { type: 'string', short: 'c' },
        host: { type: 'string' },
        port: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
      allowPositionals: false,
    })
  } catch (error) {
    throw new ConfigError('arguments', `${(error as Error).message}\n${usage}`)
  }
  const { values } = parsed
  if (values.help) {
    process.stdout.write(`${usage}\n`)
    process.exit(0)
  }
  if (!values.config) throw new ConfigError('--config', `is required\n${usage}`)
  const overrides: Overrides = {}
  if (values.host !== undefined) overrides.host = values.host
  if (values.port !== undefined) {
    const port = Number(values.port)
    if (!/^\d+$/.test(values.port) || port > 65535) throw new ConfigError('--port', `must be a port number, not "${values.port}"`)
    overrides.port = port
  }
  return { configFile: values.config, overrides }
}

async function main(): Promise<void> {
  const { configFile, overrides } = parseCli(process.argv.slice(2))
  const config = loadConfig(configFile, overrides)
  const log = pino({ level: config.log.level })
  const preflight = (probe: HostProbe) => (config.preflight.boot ? preflightBoot(probe, log) : probe)
  let host = await preflight(await probeHost(config))
  if (config.vm.snapshot.enabled) {
    // The preflight then boots a clone: the restore and the reseeding work.
    // A saved template whose clone fails is made once more.
    host = await prepareClones(host, log, preflight)
  }
  const metrics = new Metrics()
  const app = await buildServer(config, { createVm: createQemuVmFactory(host), logger: log, metrics })
  const admin = config.admin.enabled ? buildAdminServer(metrics, log) : undefined
  app.log.info({ maxVms: config.limits.maxVms, queue: config.limits.queue }, `at most ${config.limits.maxVms} VMs at once`)
  app.log.info({
    qemu: config.vm.qemu,
    qemuVersion: host.qemuVersion,
    accel: host.accel.accel,
    accelReason: host.accel.reason,
    sandbox: host.sandbox,
    dieWithVmcgi: host.deathSignalPrefix.length > 0,
  }, `accelerator: ${host.accel.accel} (${host.accel.reason})`)

  // A second signal, or a close that overruns the drain by more than a
  // second, exits at once; QEMU dies with vmcgi either way.
  closeWithGrace({ delay: config.shutdown.drainMs + 1_000, logger: { error: (message: unknown) => app.log.error(message) } }, async ({ signal, err }) => {
    if (err) app.log.error({ err }, 'closing after an error')
    else app.log.info({ signal, drainMs: config.shutdown.drainMs }, 'closing: draining requests in flight')
    await Promise.all([app.closeGracefully(config.shutdown.drainMs), admin?.close()])
    app.log.info('closed')
  })
  await listenOn(app, 'listen', config.listen)
  if (admin) await listenOn(admin, 'admin', config.admin)
}

/** A listener that cannot be opened is the config's fault: it exits 2, naming the field. */
async function listenOn(server: { listen(options: { host: string; port: number }): Promise<string> }, section: string, { host, port }: { host: string; port: number }): Promise<void> {
  try {
    await server.listen({ host, port })
  } catch (error) {
    const { code, message } = error as NodeJS.ErrnoException
    if (code === 'ENOTFOUND' || code === 'EAI_AGAIN' || code === 'EAI_NONAME' || code === 'EADDRNOTAVAIL') {
      throw new ConfigError(`${section}.host`, `cannot listen on "${host}": ${message}`)
    }
    if (code === 'EADDRINUSE' || code === 'EACCES') throw new ConfigError(`${section}.port`, `cannot listen on port ${port}: ${message}`)
    throw error
  }
}

main().catch((error: unknown) => {
  if (error instanceof ConfigError) {
    process.stderr.write(`vmcgi: config: ${error.message}\n`)
    process.exit(2)
  }
  process.stderr.write(`vmcgi: ${(error as Error)?.stack ?? String(error)}\n`)
  process.exit(1)
})
