import { describe, expect, it } from 'vitest'
import { ImageError } from '../../../src/image/errors.js'
import { resolveUser } from '../../../src/image/user.js'
import { fieldOf as refusedField } from '../../helpers/field-of.js'

const passwd = [
  'root:x:0:0:root:/root:/bin/bash',
  '# a comment',
  'daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin',
  'app:x:999:999::/home/app:/bin/sh',
  'broken line',
].join('\n')
const group = ['root:x:0:', 'daemon:x:1:', 'staff:x:50:app,daemon', 'app:x:999:', 'audio:x:29:app'].join('\n')

const fieldOf = (run: () => unknown) => refusedField(ImageError, run)

describe('resolveUser', () => {
  it('is root when the image names no user, even with no passwd at all', () => {
    expect(resolveUser('', passwd, group)).toEqual({ uid: 0, gid: 0, groups: [0], home: '/root' })
    expect(resolveUser('', '', '')).toEqual({ uid: 0, gid: 0, groups: [0], home: '/' })
  })

  it('resolves a name to its uid, primary gid, supplementary groups and home', () => {
    expect(resolveUser('app', passwd, group)).toEqual({ uid: 999, gid: 999, groups: [999, 50, 29], home: '/home/app' })
  })

  it('resolves a uid that passwd lists like its name', () => {
    expect(resolveUser('999', passwd, group)).toEqual(resolveUser('app', passwd, group))
  })

  it('takes a bare uid that passwd does not list, with gid 0', () => {
    expect(resolveUser('1234', passwd, group)).toEqual({ uid: 1234, gid: 0, groups: [0], home: '/' })
  })

  it('takes name:group and uid:gid, and a group given replaces the supplementary ones', () => {
    expect(resolveUser('app:staff', passwd, group)).toEqual({ uid: 999, gid: 50, groups: [50], home: '/home/app' })
    expect(resolveUser('1000:1000', passwd, group)).toEqual({ uid: 1000, gid: 1000, groups: [1000], home: '/' })
  })

  it('refuses a user or group the image does not define, and malformed forms', () => {
    expect(fieldOf(() => resolveUser('nobody', passwd, group))).toBe('user')
    expect(fieldOf(() => resolveUser('app:nogroup', passwd, group))).toBe('user')
    expect(fieldOf(() => resolveUser('app:', passwd, group))).toBe('user')
    expect(fieldOf(() => resolveUser('a:b:c', passwd, group))).toBe('user')
    expect(fieldOf(() => resolveUser('app', '', ''))).toBe('user')
    expect(fieldOf(() => resolveUser('4294967295', passwd, group))).toBe('user')
  })
})
