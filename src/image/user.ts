// An image's `User` resolved against the image's own /etc/passwd and
// /etc/group, on the host: the guest's init is static and looks nothing up.
// The forms are the OCI image spec's: name, uid, name:group, uid:gid,
// name:gid, uid:group. A bare uid that passwd does not list is allowed, with
// gid 0, as Docker does.

import { ImageError } from './errors.js'

export interface ResolvedUser {
  uid: number
  gid: number
  /** Supplementary groups: the groups of /etc/group that list the user by name, and the primary one. */
  groups: number[]
  /** The user's home in passwd, for a HOME the image does not set; "/" when unknown. */
  home: string
}

interface PasswdEntry { name: string; uid: number; gid: number; home: string }
interface GroupEntry { name: string; gid: number; members: string[] }

const numeric = /^\d+$/
/** The largest id the kernel takes: (uid_t)-1 is "no change". */
const maxId = 4294967294

export function resolveUser(user: string, passwdText: string, groupText: string): ResolvedUser {
  const passwd = parseColonFile(passwdText, 7).map(([name, , uid, gid, , home]) => ({
    name: name!, uid: Number(uid), gid: Number(gid), home: home || '/',
  }) satisfies PasswdEntry)
  const groups = parseColonFile(groupText, 4).map(([name, , gid, members]) => ({
    name: name!, gid: Number(gid), members: members ? members.split(',').filter(Boolean) : [],
  }) satisfies GroupEntry)

  // No User is root, whether or not the image has a passwd (FROM scratch has none).
  const [userPart = '', groupPart, ...rest] = (user || '0').split(':')
  if (!userPart || rest.length > 0 || groupPart === '') throw new ImageError('user', `"${user}" is not a user: use name, uid, name:group or uid:gid`)

  const entry = numeric.test(userPart)
    ? passwd.find((candidate) => candidate.uid === Number(userPart))
    : passwd.find((candidate) => candidate.name === userPart)
  if (!entry && !numeric.test(userPart)) throw new ImageError('user', `the image's /etc/passwd has no user "${userPart}"`)
  const uid = entry?.uid ?? Number(userPart)

  let gid: number
  if (groupPart === undefined) {
    gid = entry?.gid ?? 0
  } else if (numeric.test(groupPart)) {
    gid = Number(groupPart)
  } else {
    const group = groups.find((candidate) => candidate.name === groupPart)
    if (!group) throw new ImageError('user', `the image's /etc/group has no group "${groupPart}"`)
    gid = group.gid
  }
  // A group given with the user replaces the supplementary ones, as in Docker.
  const supplementary = groupPart === undefined && entry
    ? groups.filter((group) => group.members.includes(entry.name)).map((group) => group.gid)
    : []
  for (const [name, id] of [['uid', uid], ['gid', gid]] as const) {
    if (id > maxId) throw new ImageError('user', `${name} ${id} is larger than ${maxId}`)
  }
  return { uid, gid, groups: [...new Set([gid, ...supplementary])], home: entry?.home ?? '/' }
}

/** The lines of a passwd-like file as fields; comments, blanks and short or non-numeric lines skipped. */
function parseColonFile(text: string, fields: number): string[][] {
  return text.split('\n')
    .filter((line) => line && !line.startsWith('#'))
    .map((line) => line.split(':'))
    .filter((parts) => parts.length >= fields - 1 && numeric.test(parts[2] ?? ''))
}
