import { describe, expect, it } from 'vitest'
import { appFor, defaultPath, encodeApp, type ImageRunConfig } from '../../../src/image/app.js'
import { ImageError } from '../../../src/image/errors.js'
import { fieldOf as refusedField } from '../../helpers/field-of.js'

const etc = { passwd: 'root:x:0:0:root:/root:/bin/sh\napp:x:999:999::/home/app:/bin/sh\n', group: 'root:x:0:\napp:x:999:\n' }
const python: ImageRunConfig = {
  User: 'app',
  Env: ['PATH=/usr/bin:/bin', 'GREETING=hello'],
  Entrypoint: ['python3'],
  Cmd: ['/app/server.py'],
  WorkingDir: '/app',
  ExposedPorts: { '8080/tcp': {} },
}

const fieldOf = (run: () => unknown) => refusedField(ImageError, run)

describe('appFor', () => {
  it('runs Entrypoint + Cmd with the image\'s Env, WorkingDir, User and exposed port', () => {
    const app = appFor(python, {}, etc)
    expect(app.argv).toEqual(['python3', '/app/server.py'])
    expect(app.env).toEqual(['PATH=/usr/bin:/bin', 'GREETING=hello', 'HOME=/home/app', 'HOSTNAME=vmcgi'])
    expect(app.cwd).toBe('/app')
    expect(app.user).toMatchObject({ uid: 999, gid: 999 })
    expect(app.port).toBe(8080)
  })

  it('applies overrides as docker run does', () => {
    const app = appFor(python, { cmd: ['-m', 'http.server'], env: ['GREETING=bye', 'EXTRA=1', 'FROM_HOST'], workdir: '/srv', user: 'root', port: 9000 }, etc, { FROM_HOST: 'yes' })
    expect(app.argv).toEqual(['python3', '-m', 'http.server'])
    expect(app.env).toContain('GREETING=bye')
    expect(app.env).toContain('EXTRA=1')
    expect(app.env).toContain('FROM_HOST=yes')
    expect(app).toMatchObject({ cwd: '/srv', port: 9000, user: { uid: 0, gid: 0 } })
    // An entrypoint given alone drops the image's Cmd.
    expect(appFor(python, { entrypoint: ['/bin/sh'] }, etc).argv).toEqual(['/bin/sh'])
  })

  it('never reads the build\'s environment for the image\'s own Env; --env NAME does, and unsets what is unset', () => {
    const app = appFor({ ...python, Env: ['SECRET', 'GREETING=hi'] }, { env: ['GREETING'] }, etc, { SECRET: 'of the host' })
    expect(app.env.some((entry) => entry.startsWith('SECRET'))).toBe(false)
    expect(app.env.some((entry) => entry.startsWith('GREETING'))).toBe(false)
  })

  it('gives a default PATH and / as the working directory when the image has none', () => {
    const app = appFor({ Cmd: ['/server'], ExposedPorts: { '80/tcp': {} } }, {}, etc)
    expect(app.env[0]).toBe(`PATH=${defaultPath}`)
    expect(app.cwd).toBe('/')
  })

  it('refuses an image with no command, no port or several, and a relative working directory', () => {
    expect(fieldOf(() => appFor({ ...python, Entrypoint: null, Cmd: null }, {}, etc))).toBe('cmd')
    expect(fieldOf(() => appFor({ ...python, ExposedPorts: {} }, {}, etc))).toBe('port')
    expect(fieldOf(() => appFor({ ...python, ExposedPorts: { '53/udp': {} } }, {}, etc))).toBe('port')
    expect(fieldOf(() => appFor({ ...python, ExposedPorts: { '80/tcp': {}, '443/tcp': {} } }, {}, etc))).toBe('port')
    expect(fieldOf(() => appFor(python, { workdir: 'app' }, etc))).toBe('workdir')
    expect(fieldOf(() => appFor({ ...python, ExposedPorts: { '0/tcp': {} } }, {}, etc))).toBe('port')
    expect(fieldOf(() => appFor({ ...python, Entrypoint: 'python3 app.py' as unknown as string[] }, {}, etc))).toBe('Entrypoint')
    expect(fieldOf(() => appFor({ ...python, Env: [1] as unknown as string[] }, {}, etc))).toBe('Env')
    expect(fieldOf(() => appFor(python, { user: 'ghost' }, etc))).toBe('user')
  })
})

describe('encodeApp', () => {
  it('writes NUL-terminated key=value strings in the order the init reads them', () => {
    const encoded = encodeApp(appFor({ ...python, Env: ['A=1 2'] }, {}, etc)).toString('utf8')
    expect(encoded.split('\0')).toEqual([
      'uid=999', 'gid=999', 'groups=999', 'cwd=/app', 'port=8080',
      'env=A=1 2', 'env=PATH=' + defaultPath, 'env=HOME=/home/app', 'env=HOSTNAME=vmcgi',
      'arg=python3', 'arg=/app/server.py', '',
    ])
  })

  it('writes the restore signal after the port, when there is one', () => {
    const encoded = encodeApp({ ...appFor(python, {}, etc), restoreSignal: 12 }).toString('utf8')
    expect(encoded.split('\0').slice(4, 6)).toEqual(['port=8080', 'restore-signal=12'])
  })

  it('refuses a NUL byte, which the format cannot carry', () => {
    expect(fieldOf(() => encodeApp(appFor(python, { cmd: ['a\0b'] }, etc)))).toBe('config')
  })
})
